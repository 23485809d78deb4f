#!/usr/bin/env node
// Streams a reply from autoglm-serve, loading the contract straight from protos/.
//
//   node chat.mjs "prompt" [--image FILE ...] [--max-new-tokens N] [--target HOST:PORT]
//
// Target: --target, else $AUTOGLM_TARGET, else 127.0.0.1:$AUTOGLM_PORT (default 50051).
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

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

function sniffImageMime(data) {
  if (data.subarray(0, 8).equals(Buffer.from("89504e470d0a1a0a", "hex"))) return "image/png";
  if (data.subarray(0, 3).equals(Buffer.from("ffd8ff", "hex"))) return "image/jpeg";
  if (data.toString("latin1", 0, 4) === "RIFF" && data.toString("latin1", 8, 12) === "WEBP") {
    return "image/webp";
  }
  return ""; // let the server sniff, and reject, it
}

function parseCommandLine() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      target: { type: "string" },
      image: { type: "string", multiple: true, default: [] },
      "max-new-tokens": { type: "string", default: "128" },
      timeout: { type: "string", default: "120" },
    },
  });
  if (positionals.length !== 1) {
    console.error('usage: node chat.mjs "prompt" [--image FILE ...] [--max-new-tokens N]');
    process.exit(2);
  }
  const port = process.env.AUTOGLM_PORT ?? "50051";
  return {
    prompt: positionals[0],
    images: values.image,
    maxNewTokens: Number(values["max-new-tokens"]),
    timeoutSeconds: Number(values.timeout),
    target: values.target ?? process.env.AUTOGLM_TARGET ?? `127.0.0.1:${port}`,
  };
}

function buildRequest({ prompt, images, maxNewTokens }) {
  const imageParts = images.map((path) => {
    const data = readFileSync(path);
    return { image: { data, mime_type: sniffImageMime(data) } };
  });
  return {
    messages: [{ role: "ROLE_USER", parts: [{ text: prompt }, ...imageParts] }],
    sampling: { max_new_tokens: maxNewTokens },
  };
}

function main() {
  const options = parseCommandLine();
  const InferenceService = loadInferenceService();
  const client = new InferenceService(options.target, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  });
  const metadata = new grpc.Metadata();
  metadata.set("x-request-id", `node-${process.pid}-${Date.now()}`);
  const deadline = new Date(Date.now() + options.timeoutSeconds * 1000);

  const call = client.Generate(buildRequest(options), metadata, { deadline });
  call.on("data", (response) => {
    if (response.text_delta) process.stdout.write(response.text_delta);
    if (response.final) {
      const { usage, finish_reason: finishReason } = response.final;
      process.stdout.write("\n");
      console.error(
        `usage: ${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} completion` +
          ` tokens; finish: ${finishReason}; request ${response.request_id}`,
      );
    }
  });
  call.on("error", (error) => {
    const retryAfter = error.metadata?.get("retry-after-ms")[0];
    console.error(`error: ${grpc.status[error.code]}: ${error.details}`);
    if (retryAfter) console.error(`  retry after ${retryAfter} ms`);
    process.exitCode = 1;
  });
  call.on("end", () => client.close());
}

main();
