#!/usr/bin/env node
// Streams a reply from autoglm-serve, loading the contract straight from protos/.
//
//   node chat.mjs "prompt" [--image FILE ...] [--max-new-tokens N] [--target HOST:PORT]
//
// Target: --target, else $AUTOGLM_TARGET, else 127.0.0.1:$AUTOGLM_PORT (default 50051).
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { callSettings, connect, reportError, resolveTarget, usageLine } from "./inference.mjs";

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
  return {
    prompt: positionals[0],
    images: values.image,
    maxNewTokens: Number(values["max-new-tokens"]),
    timeoutSeconds: Number(values.timeout),
    target: resolveTarget(values.target),
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
  const client = connect(options.target);
  const { metadata, options: callOptions } = callSettings(options.timeoutSeconds);

  const call = client.Generate(buildRequest(options), metadata, callOptions);
  call.on("data", (response) => {
    if (response.text_delta) process.stdout.write(response.text_delta);
    if (response.final) {
      process.stdout.write("\n");
      console.error(usageLine(response));
    }
  });
  call.on("error", reportError);
  call.on("end", () => client.close());
}

main();
