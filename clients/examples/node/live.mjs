#!/usr/bin/env node
// Speaks a WAV file to autoglm-serve over GenerateLive, as it would be spoken, and streams
// the reply; loads the contract straight from protos/.
//
//   node live.mjs FILE.wav [--prompt TEXT] [--chunk-ms 100] [--no-pace]
//                 [--max-new-tokens N] [--temperature T] [--target HOST:PORT]
//
// The file must be 16 kHz mono 16-bit PCM. Each chunk leaves when its last sample would
// have been spoken (--no-pace: at once); stderr gets the usage and the time from the end
// of the audio to the first token. Target: as chat.mjs.
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import { callSettings, connect, reportError, resolveTarget, usageLine } from "./inference.mjs";

const SAMPLE_RATE_HZ = 16000;
const BYTES_PER_SAMPLE = 2; // s16le
const WAVE_FORMAT_PCM = 1;
const WAVE_FORMAT_EXTENSIBLE = 0xfffe;

class InputError extends Error {}

function parseCommandLine() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      target: { type: "string" },
      prompt: { type: "string" },
      "chunk-ms": { type: "string", default: "100" },
      "no-pace": { type: "boolean", default: false },
      "max-new-tokens": { type: "string", default: "128" },
      temperature: { type: "string" }, // unset: the server's default; 0: greedy
      timeout: { type: "string", default: "120" },
    },
  });
  const chunkMs = Number(values["chunk-ms"]);
  if (positionals.length !== 1 || !Number.isInteger(chunkMs) || chunkMs < 1) {
    console.error(
      "usage: node live.mjs FILE.wav [--prompt TEXT] [--chunk-ms MS] [--no-pace]" +
        " [--max-new-tokens N] [--temperature T]",
    );
    process.exit(2);
  }
  return {
    wavPath: positionals[0],
    prompt: values.prompt,
    chunkMs,
    pace: !values["no-pace"],
    maxNewTokens: Number(values["max-new-tokens"]),
    temperature: values.temperature === undefined ? undefined : Number(values.temperature),
    timeoutSeconds: Number(values.timeout),
    target: resolveTarget(values.target),
  };
}

/** The samples of a 16 kHz mono 16-bit PCM WAV file, as s16le. */
function readWavPcm(path) {
  let data;
  try {
    data = readFileSync(path);
  } catch (error) {
    throw new InputError(`cannot read ${path}: ${error.message}`);
  }
  if (data.toString("latin1", 0, 4) !== "RIFF" || data.toString("latin1", 8, 12) !== "WAVE") {
    throw new InputError(`${path} is not a WAV file`);
  }
  let format;
  let samples;
  for (let offset = 12; offset + 8 <= data.length; ) {
    const id = data.toString("latin1", offset, offset + 4);
    const size = data.readUInt32LE(offset + 4);
    const body = data.subarray(offset + 8, offset + 8 + size);
    if (id === "fmt " && body.length >= 16) {
      format = {
        tag: body.readUInt16LE(0),
        channels: body.readUInt16LE(2),
        rate: body.readUInt32LE(4),
        bits: body.readUInt16LE(14),
      };
    } else if (id === "data") {
      samples = body;
    }
    offset += 8 + size + (size % 2); // RIFF chunks are padded to an even length
  }
  if (!format || !samples) throw new InputError(`${path} has no fmt or no data chunk`);
  if (format.tag !== WAVE_FORMAT_PCM && format.tag !== WAVE_FORMAT_EXTENSIBLE) {
    throw new InputError(`${path} is not PCM (format tag ${format.tag})`);
  }
  const { rate, channels, bits } = format;
  if (rate !== SAMPLE_RATE_HZ || channels !== 1 || bits !== 8 * BYTES_PER_SAMPLE) {
    throw new InputError(
      `live audio is 16 kHz mono 16-bit; this WAV is ${rate} Hz, ${channels} channel(s),` +
        ` ${bits}-bit (convert it: ffmpeg -i IN -ac 1 -ar 16000 -sample_fmt s16 OUT.wav)`,
    );
  }
  return samples.subarray(0, samples.length - (samples.length % BYTES_PER_SAMPLE));
}

function startMessage({ prompt, maxNewTokens, temperature }) {
  // The speech ends the last user message, or becomes one when there is none.
  const messages = prompt === undefined ? [] : [{ role: "ROLE_USER", parts: [{ text: prompt }] }];
  return {
    start: {
      request: { messages, sampling: { max_new_tokens: maxNewTokens, temperature } },
      format: { sample_rate_hz: SAMPLE_RATE_HZ, encoding: "PCM_ENCODING_S16LE" },
    },
  };
}

/** Write the samples in chunks of `chunkMs`, then `end`; resolve to when `end` was sent. */
async function speak(call, samples, { chunkMs, pace }, isOpen) {
  const chunkBytes = (SAMPLE_RATE_HZ * chunkMs * BYTES_PER_SAMPLE) / 1000;
  const started = performance.now();
  for (let offset = 0; offset < samples.length; offset += chunkBytes) {
    const chunk = samples.subarray(offset, offset + chunkBytes);
    const spokenMs = ((offset + chunk.length) / (SAMPLE_RATE_HZ * BYTES_PER_SAMPLE)) * 1000;
    if (pace) await sleep(Math.max(0, started + spokenMs - performance.now()));
    if (!isOpen()) return undefined; // the server ended the call early (see the error)
    call.write({ audio: { data: chunk } });
  }
  if (!isOpen()) return undefined;
  call.write({ end: {} });
  call.end();
  return performance.now();
}

async function main() {
  const options = parseCommandLine();
  let samples;
  try {
    samples = readWavPcm(options.wavPath);
  } catch (error) {
    if (!(error instanceof InputError)) throw error;
    console.error(`error: ${error.message}`);
    process.exit(2);
  }
  const client = connect(options.target);
  const { metadata, options: callOptions } = callSettings(options.timeoutSeconds);

  const call = client.GenerateLive(metadata, callOptions);
  let open = true;
  let firstTokenAt;
  let final;
  call.on("data", (response) => {
    if (firstTokenAt === undefined && (response.text_delta || response.reasoning_delta)) {
      firstTokenAt = performance.now();
    }
    if (response.text_delta) process.stdout.write(response.text_delta);
    if (response.final) final = response;
  });
  const finished = new Promise((resolve) => {
    call.on("error", (error) => {
      open = false;
      reportError(error);
      resolve();
    });
    call.on("end", resolve);
  });

  call.write(startMessage(options));
  const audioEndedAt = await speak(call, samples, options, () => open);
  await finished;
  client.close();
  if (!final) return;
  process.stdout.write("\n");
  console.error(usageLine(final));
  const audioSeconds = final.final.usage.audio_seconds.toFixed(2);
  const reply =
    firstTokenAt === undefined
      ? "no text streamed"
      : `first token ${((firstTokenAt - audioEndedAt) / 1000).toFixed(3)} s after its end`;
  console.error(`live: ${audioSeconds} s of audio; ${reply}`);
}

main();
