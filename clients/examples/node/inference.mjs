// What chat.mjs and live.mjs share: the InferenceService loaded straight from protos/, a
// client of it, each call's metadata and deadline, and how a reply's end and a failed call
// are reported.
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "protos");
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

function loadInferenceService() {
  const definition = protoLoader.loadSync("autoglm/inference/v1/inference_service.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as written in the .proto (text_delta, ...)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).autoglm.inference.v1.InferenceService;
}

/** --target, else $AUTOGLM_TARGET, else 127.0.0.1:$AUTOGLM_PORT (default 50051). */
export function resolveTarget(target) {
  return target ?? process.env.AUTOGLM_TARGET ?? `127.0.0.1:${process.env.AUTOGLM_PORT ?? "50051"}`;
}

export function connect(target) {
  const InferenceService = loadInferenceService();
  return new InferenceService(target, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  });
}

/** An x-request-id of this process, and the call's deadline. */
export function callSettings(timeoutSeconds) {
  const metadata = new grpc.Metadata();
  metadata.set("x-request-id", `node-${process.pid}-${Date.now()}`);
  return { metadata, options: { deadline: new Date(Date.now() + timeoutSeconds * 1000) } };
}

/** The line for stderr once the stream's `final` message has come. */
export function usageLine(response) {
  const { usage, finish_reason: finishReason } = response.final;
  return (
    `usage: ${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} completion` +
    ` tokens; finish: ${finishReason}; request ${response.request_id}`
  );
}

/** Print a failed call's status code name (and any retry hint) and set exit code 1. */
export function reportError(error) {
  const retryAfter = error.metadata?.get("retry-after-ms")[0];
  console.error(`error: ${grpc.status[error.code]}: ${error.details}`);
  if (retryAfter) console.error(`  retry after ${retryAfter} ms`);
  process.exitCode = 1;
}
