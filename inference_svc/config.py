"""Server configuration: one validated dataclass, the source of the flags, the
AUTOGLM_<FLAG> environment variables and the README's table (see autoglm_settings)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoglm_settings import MIB, add_arguments, check_choices, load, section, setting
from inference_svc.engine.config import EngineConfig
from inference_svc.types import SamplingParams

ENV_PREFIX = "AUTOGLM_"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# weight precision per module (inference_svc/model/precision.py)
DECODER_WEIGHTS = ("auto", "fp32", "bf16", "fp16", "fp8", "int8", "int4")
VISION_WEIGHTS = ("auto", "fp32", "bf16", "fp16", "int8")
CONTENT_FORMATS = ("string", "openai")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class TlsFiles:
    """A listener's certificate chain and key; with `client_ca`, client certificates are
    required and checked against it (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    """The service's whole configuration: the engine's settings and the sampling defaults
    are nested as they are passed on, their flags unprefixed."""

    host: str = setting("0.0.0.0", help="public gRPC address to bind")
    port: int = setting(50051, help="public gRPC port (0 picks a free one; see --port-file)")
    model_dir: Path | None = setting(None, shown="embedded default", help=(
        "a modular bundle or a GLM-4.1V checkpoint directory"))
    cache_dir: Path | None = setting(None, shown="$XDG_CACHE_HOME/autoglm-serve", help=(
        "where the embedded default is converted and cached"))
    device: str = setting("cpu", help=(
        "`cpu`, `cuda:N`, `auto` (the decoder over every GPU: a GLM-4.1V checkpoint's layers "
        "split evenly in order, a modular bundle's by accelerate), or a list such as "
        "`cuda:0,cuda:1` or `cuda:0,cpu` (a GLM-4.1V checkpoint's layers split over those, "
        "each device holding its layers' KV)"))
    encoder_device: str = setting("", shown="the decoder's", help=(
        "card for the encoders (with `auto`: the last GPU)"))
    kv_reserve_fraction: float = setting(0.3, help="share of each GPU kept free of weights "
                                                   "for KV cache (device `auto`)")
    dtype: str = setting("auto", choices=DTYPES, help="weights' type; auto: float32 on CPU, "
                                                      "bfloat16 on CUDA")
    decoder_weights: str = setting("auto", choices=DECODER_WEIGHTS, help=(
        "the decoder's weight precision (docs/operations.md): auto keeps --dtype; int8 and "
        "int4 (groups of 128 on CUDA, 32 on a CPU) are weight-only, fp8 also quantizes "
        "activations; on CUDA int4 needs compute capability 8.0+, fp8 8.9+, and both "
        "compute in bfloat16; embeddings keep the floating type, and so does the lm_head "
        "on a GPU; on a CPU int8 and int4 make the lm_head int8 (a copy where it is tied to "
        "the embedding), hold the token table and the KV cache in bfloat16, and compute in "
        "bfloat16 where the CPU has bfloat16 units (AMX, AVX512-BF16); the embedded "
        "default on such a CPU decodes ~1.3-1.5x faster than fp32 in int8 and reads a long "
        "prompt ~1.9x faster (+0.4% perplexity), and decodes ~1.8-2x faster in int4 (+0.0%, "
        "its weights being 4-bit at source) but reads a long prompt ~1.2x slower"))
    vision_weights: str = setting("auto", choices=VISION_WEIGHTS, help=(
        "the vision encoder's weight precision: auto keeps --dtype; int8 is weight-only"))
    chat_content_format: str = setting("string", choices=CONTENT_FORMATS, help=(
        "how a GLM-4.1V message's parts reach its chat template, as vLLM's "
        "--chat-template-content-format: string (one string, image placeholders first; "
        "the phone agent's deployment) or openai (the parts in the order sent)"))
    served_model_name: str = setting("autoglm-phone-9b", help="the model name GetModelInfo "
                                                              "and the gateway report")
    defaults: SamplingParams = section(SamplingParams, named=False)
    engine: EngineConfig = section(EngineConfig, named=False)
    kv_budget_fraction: float = setting(0.0, shown="0 (off)", help=(
        "KV budget as a fraction of the decoder device's memory (overrides --kv-budget-mb "
        "when > 0)"))
    max_message_bytes: int = setting(32 * 1024 * 1024, name="max_message_mb", unit=MIB,
                                     help="largest gRPC message either way, in MiB")
    live_audio_max_utterance_s: float = setting(120.0, name="live_audio_max_utterance", help=(
        "most seconds of audio one GenerateLive stream may send (the audio decoder refuses "
        "clips past 120 s in any case)"))
    live_audio_min_chunk_ms: int = setting(10, help=(
        "shortest GenerateLive audio chunk in ms; only the last before `end` may be shorter"))
    live_audio_max_chunk_ms: int = setting(500, help="longest GenerateLive audio chunk in ms")
    live_audio_idle_timeout_s: float = setting(10.0, name="live_audio_idle_timeout", help=(
        "seconds a GenerateLive stream may go without a message before its `end`; a client "
        "that stalls longer gets DEADLINE_EXCEEDED"))
    encoder_idle_offload_s: float = setting(0.0, name="encoder_idle_offload", shown="0 (off)",
                                            help="demote an encoder unused for this many "
                                                 "seconds one tier")
    grace_period_s: float = setting(10.0, name="grace_period", help=(
        "seconds in-flight streams get on SIGTERM"))
    watchdog_timeout_s: float = setting(120.0, name="watchdog_timeout", help=(
        "seconds the model loop may go without progress while work is pending before the "
        "service exits 70 (0: off)"))
    control_socket: str = setting("/tmp/autoglm-control.sock", help=(
        "Unix socket of the control API, mode 0600 (empty: none)"))
    control_tcp: str = setting("", help="also serve the control API on HOST:PORT (requires "
                                        "--control-token and TLS)")
    control_token: str = setting("", help="bearer token the control API requires")
    control_insecure: bool = setting(False, help="allow --control-tcp without TLS (the token "
                                                 "then travels in clear)")
    tls_cert: Path | None = setting(None, help="PEM certificate chain: serve the public port "
                                               "over TLS only")
    tls_key: Path | None = setting(None, help="PEM key of --tls-cert")
    tls_client_ca: Path | None = setting(None, help="PEM CA bundle: public clients need a "
                                                    "certificate it signed (mTLS)")
    control_tls_cert: Path | None = setting(None, shown="--tls-cert", help=(
        "certificate of the TCP control listener"))
    control_tls_key: Path | None = setting(None, shown="--tls-key", help=(
        "key of the TCP control listener"))
    control_tls_client_ca: Path | None = setting(None, help=(
        "require client certificates on the TCP control listener (mTLS)"))
    max_concurrent_streams: int = setting(100, help="streams one connection may have open; "
                                                    "more wait on the client")
    keepalive_time_s: float = setting(120.0, name="keepalive_time", help=(
        "seconds of quiet before the server pings a client"))
    keepalive_timeout_s: float = setting(20.0, name="keepalive_timeout", help=(
        "seconds to wait for that ping's ack before closing the connection"))
    min_ping_interval_s: float = setting(60.0, name="min_ping_interval", help=(
        "least seconds between a client's pings without data; faster ones are strikes"))
    max_ping_strikes: int = setting(2, help="strikes before GOAWAY (ENHANCE_YOUR_CALM, "
                                            "too_many_pings); 0: no limit")
    keepalive_permit_without_calls: bool = setting(False, help=(
        "accept client pings on connections with no call open"))
    max_connection_age_s: float = setting(1800.0, name="max_connection_age", help=(
        "seconds before a public connection is asked to go away, so a mesh rebalances "
        "(0: never)"))
    max_connection_age_grace_s: float = setting(300.0, name="max_connection_age_grace", help=(
        "seconds the streams of an aged connection get to finish"))
    port_file: Path | None = setting(None, help="write the bound port (JSON: port, pid, "
                                                "serving) here, atomically")
    metrics_port: int = setting(0, shown="0 (off)", help="serve Prometheus metrics on this "
                                                         "port (docs/operations.md)")
    metrics_host: str = setting("127.0.0.1", help="address the metrics listen on")
    log_format: str = setting("auto", choices=LOG_FORMATS, help=(
        "JSON lines, or a console renderer (auto: console on a terminal)"))
    log_level: str = setting("info", help="least level logged: " + ", ".join(LOG_LEVELS))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 0..65535")
        if self.model_dir is not None and not self.model_dir.is_dir():
            raise ValueError(f"--model-dir {self.model_dir} is not a directory")
        self._check_tls()
        check_choices(self)
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log level {self.log_level!r} is not one of "
                             f"{', '.join(LOG_LEVELS)}")
        if not 0 <= self.kv_budget_fraction < 1:
            raise ValueError("kv budget fraction must be in [0, 1)")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError("kv reserve fraction must be in [0, 1)")
        if self.max_message_bytes < 1024:
            raise ValueError("max message size must be at least 1 KiB")
        self._check_live_audio()
        if self.encoder_idle_offload_s < 0:
            raise ValueError("encoder idle offload must not be negative")
        if self.grace_period_s < 0:
            raise ValueError("grace period must not be negative")
        if self.watchdog_timeout_s < 0:
            raise ValueError("watchdog timeout must not be negative")
        self._check_connection_limits()

    @property
    def public_tls(self) -> TlsFiles | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def control_tls(self) -> TlsFiles | None:
        cert = self.control_tls_cert or self.tls_cert
        key = self.control_tls_key or self.tls_key
        if cert is None or key is None:
            return None
        return TlsFiles(cert, key, self.control_tls_client_ca)

    def _check_tls(self) -> None:
        for flag, path in (
            ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--control-tls-cert", self.control_tls_cert),
            ("--control-tls-key", self.control_tls_key),
            ("--control-tls-client-ca", self.control_tls_client_ca),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path} is not a readable file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if (self.control_tls_cert is None) != (self.control_tls_key is None):
            raise ValueError("--control-tls-cert and --control-tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.control_tls_client_ca is not None and self.control_tls is None:
            raise ValueError("--control-tls-client-ca needs a control certificate "
                             "(--control-tls-cert/--control-tls-key or --tls-cert/--tls-key)")
        if not self.control_tcp:
            return
        if not self.control_token:
            raise ValueError("a TCP control listener needs --control-token")
        if self.control_tls is None and not self.control_insecure:
            raise ValueError(
                "a TCP control listener needs TLS (--control-tls-cert/--control-tls-key or "
                "--tls-cert/--tls-key); pass --control-insecure to serve it in plaintext")

    def _check_live_audio(self) -> None:
        if self.live_audio_max_utterance_s <= 0:
            raise ValueError("live audio max utterance must be positive")
        if not 1 <= self.live_audio_min_chunk_ms <= self.live_audio_max_chunk_ms:
            raise ValueError("live audio chunk bounds need 1 <= min chunk ms <= max chunk ms")
        if self.live_audio_idle_timeout_s <= 0:
            raise ValueError("live audio idle timeout must be positive")

    def _check_connection_limits(self) -> None:
        if self.max_concurrent_streams < 1:
            raise ValueError("max concurrent streams must be at least 1")
        if self.keepalive_time_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("keepalive time and timeout must be positive")
        if self.min_ping_interval_s < 0:
            raise ValueError("min ping interval must not be negative")
        if self.max_ping_strikes < 0:
            raise ValueError("max ping strikes must not be negative")
        if self.max_connection_age_s < 0 or self.max_connection_age_grace_s < 0:
            raise ValueError("max connection age and its grace must not be negative")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm-server",
        description="Serve a multimodal model over gRPC. Every flag --x-y also reads "
                    f"{ENV_PREFIX}X_Y; a flag given wins over the environment.",
    )
    add_arguments(parser, ServerConfig, ENV_PREFIX)
    return parser


def config_from_args(argv: list[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Defaults < AUTOGLM_* environment < flags, validated (ValueError) before anything
    is loaded."""
    args = build_parser().parse_args(argv)
    return load(ServerConfig, ENV_PREFIX, args, os.environ if environ is None else environ)
