"""`autoglm`: chat with, inspect and monitor an autoglm-serve service from a terminal.

Exit codes: 0 ok, 1 the RPC failed (status code name and message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from autoglm_client.calls import GenerateOptions
from autoglm_client.channel import DEFAULT_TARGET, tls_credentials
from autoglm_client.content import prompt_conversation
from autoglm_client.control import DEFAULT_CONTROL_TARGET, ControlClient
from autoglm_client.errors import AutoglmError, InputError, RpcError
from autoglm_client.inference import InferenceClient
from autoglm_client.live import SpeechEndTimer, wav_chunks
from autoglm_client.render import live_text, memory_status_text, model_info_text, usage_text
from autoglm_client.request_builders import Sampling
from autoglm_client.results import CompletionAccumulator
from autoglm_client.stream_printer import StreamPrinter

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_HOST, _, DEFAULT_PORT = DEFAULT_TARGET.rpartition(":")
DEFAULT_CHUNK_MS = 100
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def main(argv: Sequence[str] | None = None) -> int:
    _use_utf8_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "chat" and (problem := _chat_usage_problem(args)):
        parser.error(problem)
    try:
        return args.run(args)
    except InputError as error:
        print(f"autoglm: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RpcError as error:
        print(f"autoglm: {_describe_rpc_error(error)}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except AutoglmError as error:
        print(f"autoglm: error: {error}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tls = _tls_options()
    connection = _connection_options(tls)

    chat = commands.add_parser(
        "chat", parents=[connection], help="stream a reply to a prompt (with images/audio)"
    )
    chat.add_argument(
        "prompt", nargs="?", help="the user's message (with --audio-live: text before the speech)"
    )
    audio = chat.add_mutually_exclusive_group()
    _add_media_options(chat, audio)
    audio.add_argument(
        "--audio-live",
        type=Path,
        metavar="FILE",
        help="16 kHz mono 16-bit WAV streamed over GenerateLive as it would be spoken",
    )
    chat.add_argument(
        "--chunk-ms",
        type=int,
        metavar="MS",
        help=f"--audio-live chunk length (default {DEFAULT_CHUNK_MS})",
    )
    chat.add_argument(
        "--no-pace", action="store_true", help="send --audio-live's chunks as fast as it can"
    )
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, metavar="N")
    chat.add_argument("--min-new-tokens", type=int, metavar="N")
    chat.add_argument("--temperature", type=float, metavar="T", help="0 selects greedy decoding")
    chat.add_argument("--top-p", type=float, metavar="P")
    chat.add_argument("--top-k", type=int, metavar="K")
    chat.add_argument("--seed", type=int)
    chat.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop sequence (repeatable)"
    )
    chat.add_argument("--session", metavar="ID", help="multi-turn session id")
    chat.add_argument("--think", action="store_true", help="let the model think first")
    chat.add_argument(
        "--show-reasoning", action="store_true", help="print the model's reasoning (dimmed)"
    )
    chat.add_argument("--request-id", help="x-request-id to send")
    chat.add_argument("--json", action="store_true", help="print one JSON object at the end")
    chat.set_defaults(run=run_chat)

    info = commands.add_parser("info", parents=[connection], help="show the served model")
    info.add_argument("--json", action="store_true", help="print the raw response as JSON")
    info.set_defaults(run=run_info)

    count = commands.add_parser(
        "count", parents=[connection], help="count the prompt tokens of a message"
    )
    count.add_argument("prompt")
    _add_media_options(count)
    count.add_argument("--system", help="system prompt")
    count.add_argument("--think", action="store_true", help="count with thinking enabled")
    count.set_defaults(run=run_count)

    end_session = commands.add_parser(
        "end-session", parents=[connection], help="drop a session's cached state"
    )
    end_session.add_argument("session_id", metavar="ID")
    end_session.set_defaults(run=run_end_session)

    status = commands.add_parser(
        "status", parents=[tls], help="show the service's memory account"
    )
    status.add_argument(
        "--control",
        default=DEFAULT_CONTROL_TARGET,
        metavar="TARGET",
        help=f"control API target (default {DEFAULT_CONTROL_TARGET})",
    )
    status.add_argument("--token", help="control token (TCP targets); default $AUTOGLM_TOKEN")
    status.add_argument("--watch", action="store_true", help="keep refreshing until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="watch interval, seconds")
    status.add_argument("--json", action="store_true", help="print the raw account as JSON")
    status.set_defaults(run=run_status)
    return parser


def _connection_options(tls: argparse.ArgumentParser) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False, parents=[tls])
    options.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    options.add_argument(
        "--port",
        type=int,
        default=os.environ.get("AUTOGLM_PORT", DEFAULT_PORT),  # argparse applies type=int
        help="default $AUTOGLM_PORT or 50051",
    )
    options.add_argument("--target", help="gRPC target; overrides --host/--port")
    options.add_argument("--timeout", type=float, metavar="SEC", help="deadline of the call")
    return options


def _tls_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    options.add_argument(
        "--tls-ca", metavar="FILE", help="PEM CA of the server's certificate (implies --tls)"
    )
    options.add_argument("--tls-cert", metavar="FILE", help="client certificate (mTLS)")
    options.add_argument("--tls-key", metavar="FILE", help="key of --tls-cert")
    return options


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def _add_media_options(
    parser: argparse.ArgumentParser, audio: argparse._ActionsContainer | None = None
) -> None:
    """--image and --audio; `audio`, if given, is the group --audio joins."""
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="PNG/JPEG/WebP image (repeatable)",
    )
    (audio or parser).add_argument(
        "--audio",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="WAV file (repeatable)",
    )


def _inference_client(args: argparse.Namespace) -> InferenceClient:
    return InferenceClient(
        args.target or f"{args.host}:{args.port}",
        timeout=args.timeout,
        credentials=_credentials(args),
    )


def run_chat(args: argparse.Namespace) -> int:
    conversation = prompt_conversation(
        args.prompt, images=args.image, audio_clips=args.audio, system_prompt=args.system
    )
    options = GenerateOptions(
        session_id=args.session,
        enable_thinking=args.think,
        return_reasoning=args.show_reasoning,
        request_id=args.request_id,
    )
    timer = SpeechEndTimer()
    # read and checked before the call: a WAV the service cannot take is an input error
    chunk_ms = DEFAULT_CHUNK_MS if args.chunk_ms is None else args.chunk_ms
    live_chunks = None if args.audio_live is None else timer.chunks(
        wav_chunks(args.audio_live, chunk_ms, realtime=not args.no_pace)
    )
    printer = None if args.json else StreamPrinter(sys.stdout, dim=sys.stdout.isatty())
    accumulator = CompletionAccumulator()
    with _inference_client(args) as client:
        events = (
            client.stream(conversation, _sampling(args), **options) if live_chunks is None
            else client.stream_live(conversation, live_chunks, _sampling(args), **options)
        )
        for event in events:
            accumulator.add(event)
            timer.observe(event)
            if printer is not None:
                printer.write(event)
    completion = accumulator.completion()
    live = live_chunks is not None
    if printer is None:
        payload = {
            "text": completion.text,
            "reasoning": completion.reasoning,
            **asdict(completion.final),
        }
        if live:
            payload["first_token_after_audio_s"] = timer.first_token_after_s
        print(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        printer.finish()
        print(usage_text(completion.final), file=sys.stderr)
        if live:
            audio_seconds = completion.final.usage.audio_seconds
            print(live_text(audio_seconds, timer.first_token_after_s), file=sys.stderr)
    return EXIT_OK


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_sequences=args.stop,
    )


def _chat_usage_problem(args: argparse.Namespace) -> str | None:
    if args.audio_live is None:
        if args.prompt is None:
            return "chat needs a prompt (or --audio-live FILE)"
        if args.chunk_ms is not None or args.no_pace:
            return "--chunk-ms and --no-pace go with --audio-live"
    return None


def run_info(args: argparse.Namespace) -> int:
    with _inference_client(args) as client:
        info = client.model_info()
    print(_as_json(info) if args.json else model_info_text(info))
    return EXIT_OK


def run_count(args: argparse.Namespace) -> int:
    conversation = prompt_conversation(
        args.prompt, images=args.image, audio_clips=args.audio, system_prompt=args.system
    )
    with _inference_client(args) as client:
        counted = client.count_tokens(conversation, enable_thinking=args.think)
    print(
        f"{counted.prompt_tokens} prompt tokens"
        f" ({counted.image_tokens} image, {counted.audio_tokens} audio)"
    )
    return EXIT_OK


def run_end_session(args: argparse.Namespace) -> int:
    with _inference_client(args) as client:
        freed_bytes = client.end_session(args.session_id)
    print(f"session {args.session_id} ended; {freed_bytes} bytes freed")
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("AUTOGLM_TOKEN")
    render: Callable = _as_json if args.json else memory_status_text
    with ControlClient(args.control, token=token, credentials=_credentials(args)) as client:
        if not args.watch:
            print(render(client.memory_status()))
            return EXIT_OK
        clear = sys.stdout.isatty() and not args.json
        try:
            for status in client.watch(args.interval):
                print((_CLEAR_SCREEN if clear else "") + render(status), flush=True)
                if not clear:
                    print(flush=True)
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


def _as_json(message: object) -> str:
    return json.dumps(
        MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False, indent=2
    )


def _describe_rpc_error(error: RpcError) -> str:
    description = f"{error.code.name}: {error.message}"
    for field, violation in error.field_violations:
        description += f"\n  {field}: {violation}"
    if error.retry_after_s is not None:
        description += f"\n  retry after {error.retry_after_s:g} s"
    if error.request_id:
        description += f"\n  request id {error.request_id}"
    return description


def _use_utf8_output() -> None:
    """Write UTF-8 whatever the locale says, so that Chinese text never fails to print."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.encoding.lower() not in (
            "utf-8",
            "utf8",
        ):
            stream.reconfigure(encoding="utf-8")
