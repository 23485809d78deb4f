"""Server configuration: one validated dataclass, built from CLI flags and environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from inference_svc.types import SamplingParams

ENV_PREFIX = "AUTOGLM_"


@dataclass(frozen=True)
class TlsFiles:
    """A listener's certificate chain and key; with `client_ca`, client certificates are
    required and checked against it (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    model_dir: Path | None = None  # None: the embedded default, built into cache_dir
    cache_dir: Path | None = None
    device: str = "cpu"
    encoder_device: str = ""
    kv_reserve_fraction: float = 0.3
    dtype: str = "auto"
    served_model_name: str = "autoglm-phone-9b"
    defaults: SamplingParams = field(default_factory=SamplingParams)
    max_message_bytes: int = 32 * 1024 * 1024
    max_queued: int = 64
    max_batch: int = 16
    kv_budget_bytes: int = 2 * 1024**3
    kv_budget_fraction: float = 0.0
    activation_budget_bytes: int = 1024**3
    prefix_caching: bool = True
    session_idle_ttl_s: float = 600.0
    max_pixels: int = 1_003_520
    pressure_max_pixels: int = 200_704
    encoder_idle_offload_s: float = 0.0
    grace_period_s: float = 10.0
    prefill_chunk_tokens: int | None = None  # None: by device (see engine)
    kv_block_tokens: int = 16
    queue_timeout_s: float = 30.0
    watchdog_timeout_s: float = 120.0
    control_socket: str = "/tmp/autoglm-control.sock"
    control_tcp: str = ""
    control_token: str = ""
    control_insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    control_tls_cert: Path | None = None  # None: --tls-cert
    control_tls_key: Path | None = None  # None: --tls-key
    control_tls_client_ca: Path | None = None
    max_concurrent_streams: int = 100
    keepalive_time_s: float = 120.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 60.0
    max_ping_strikes: int = 2
    keepalive_permit_without_calls: bool = False
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 300.0
    port_file: Path | None = None
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_format: str = "auto"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 0..65535")
        self._check_tls()
        if not 0 <= self.kv_budget_fraction < 1:
            raise ValueError("kv budget fraction must be in [0, 1)")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError("kv reserve fraction must be in [0, 1)")
        if self.dtype not in {"auto", "float32", "bfloat16", "float16"}:
            raise ValueError(f"dtype {self.dtype!r} is not auto, float32, bfloat16 or float16")
        if self.max_message_bytes < 1024:
            raise ValueError("max message size must be at least 1 KiB")
        if not 4096 <= self.pressure_max_pixels <= self.max_pixels:
            raise ValueError("pressure max pixels must be in [4096, max pixels]")
        if self.encoder_idle_offload_s < 0:
            raise ValueError("encoder idle offload must not be negative")
        if self.grace_period_s < 0:
            raise ValueError("grace period must not be negative")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 0:
            raise ValueError("prefill chunk tokens must not be negative")
        if not 1 <= self.kv_block_tokens <= 1024:
            raise ValueError("KV block tokens must be in [1, 1024]")
        if self.queue_timeout_s <= 0:
            raise ValueError("queue timeout must be positive")
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


def _env(name: str, default):
    return os.environ.get(ENV_PREFIX + name, default)


def _env_flag(name: str) -> bool:
    return _env(name, "") not in ("", "0", "false")


def _path(value: str) -> Path | None:
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoglm-server",
        description="Serve a multimodal model over gRPC. Every flag also reads AUTOGLM_<FLAG>.",
    )
    p.add_argument("--host", default=_env("HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 50051)),
                   help="gRPC port (0 picks a free one; see --port-file)")
    p.add_argument("--model-dir", default=_env("MODEL_DIR", ""),
                   help="local modular bundle or GLM-4.1V checkpoint; default: embedded model")
    p.add_argument("--cache-dir", default=_env("CACHE_DIR", ""),
                   help="where the embedded default is converted and cached")
    p.add_argument("--device", default=_env("DEVICE", "cpu"),
                   help="cpu, cuda:N, or auto (the decoder over every GPU with accelerate)")
    p.add_argument("--encoder-device", default=_env("ENCODER_DEVICE", ""),
                   help="card for the encoders (default: the decoder's; last GPU with auto)")
    p.add_argument("--kv-reserve-fraction", type=float,
                   default=float(_env("KV_RESERVE_FRACTION", 0.3)),
                   help="share of each GPU kept free of weights for KV cache (device auto)")
    p.add_argument("--dtype", default=_env("DTYPE", "auto"))
    p.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME", "autoglm-phone-9b"))
    p.add_argument("--max-new-tokens", type=int, default=int(_env("MAX_NEW_TOKENS", 256)))
    p.add_argument("--min-new-tokens", type=int, default=int(_env("MIN_NEW_TOKENS", 32)))
    p.add_argument("--temperature", type=float, default=float(_env("TEMPERATURE", 0.7)))
    p.add_argument("--top-p", type=float, default=float(_env("TOP_P", 0.9)))
    p.add_argument("--repetition-penalty", type=float,
                   default=float(_env("REPETITION_PENALTY", 1.2)))
    p.add_argument("--max-message-mb", type=float, default=float(_env("MAX_MESSAGE_MB", 32)))
    p.add_argument("--max-queued", type=int, default=int(_env("MAX_QUEUED", 64)))
    p.add_argument("--queue-timeout", type=float, default=float(_env("QUEUE_TIMEOUT", 30)),
                   help="seconds a new request may wait for admission before "
                        "RESOURCE_EXHAUSTED (preempted requests wait as long as it takes)")
    p.add_argument("--max-pixels", type=int, default=int(_env("MAX_PIXELS", 1_003_520)))
    p.add_argument("--pressure-max-pixels", type=int,
                   default=int(_env("PRESSURE_MAX_PIXELS", 200_704)),
                   help="pixel budget per image while under memory pressure")
    p.add_argument("--encoder-idle-offload", type=float,
                   default=float(_env("ENCODER_IDLE_OFFLOAD", 0)),
                   help="demote an encoder unused for this many seconds one tier (0: off)")
    p.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", 16)),
                   help="most sequences decoded together")
    p.add_argument("--kv-budget-mb", type=float, default=float(_env("KV_BUDGET_MB", 2048)),
                   help="bytes of KV cache (running requests + idle sessions), in MiB")
    p.add_argument("--kv-budget-fraction", type=float,
                   default=float(_env("KV_BUDGET_FRACTION", 0)),
                   help="KV budget as a fraction of the decoder device's memory (overrides "
                        "--kv-budget-mb when > 0)")
    p.add_argument("--activation-budget-mb", type=float,
                   default=float(_env("ACTIVATION_BUDGET_MB", 1024)),
                   help="most encoder activation memory one request may need, in MiB")
    p.add_argument("--no-prefix-caching", action="store_true",
                   default=_env_flag("NO_PREFIX_CACHING"),
                   help="reuse KV only within a session id")
    p.add_argument("--session-idle-ttl", type=float, default=float(_env("SESSION_IDLE_TTL", 600)),
                   help="seconds an idle session's KV is kept")
    p.add_argument("--grace-period", type=float, default=float(_env("GRACE_PERIOD", 10)))
    chunk = _env("PREFILL_CHUNK_TOKENS", "")
    p.add_argument("--prefill-chunk-tokens", type=int, default=int(chunk) if chunk else None,
                   help="prompt positions per prefill pass; a cancel or deadline stops the "
                        "prefill between chunks (0: whole prompt at once; default: 128 on "
                        "CPU, 2048 on CUDA)")
    p.add_argument("--kv-block-tokens", type=int, default=int(_env("KV_BLOCK_TOKENS", 16)),
                   help="token positions per KV block (the unit of allocation, sharing and "
                        "prefix caching)")
    p.add_argument("--watchdog-timeout", type=float,
                   default=float(_env("WATCHDOG_TIMEOUT", 120)),
                   help="seconds the model loop may go without progress while work is "
                        "pending before the service exits non-zero (0: off)")
    p.add_argument("--control-socket", default=_env("CONTROL_SOCKET", "/tmp/autoglm-control.sock"))
    p.add_argument("--control-tcp", default=_env("CONTROL_TCP", ""),
                   help="also serve the control API on HOST:PORT (requires --control-token)")
    p.add_argument("--control-token", default=_env("CONTROL_TOKEN", ""))
    p.add_argument("--control-insecure", action="store_true",
                   default=_env_flag("CONTROL_INSECURE"),
                   help="allow --control-tcp without TLS (the token then travels in clear)")
    p.add_argument("--tls-cert", default=_env("TLS_CERT", ""),
                   help="PEM certificate chain: serve the public port over TLS")
    p.add_argument("--tls-key", default=_env("TLS_KEY", ""), help="PEM key of --tls-cert")
    p.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA", ""),
                   help="PEM CA bundle: require client certificates it signed (mTLS)")
    p.add_argument("--control-tls-cert", default=_env("CONTROL_TLS_CERT", ""),
                   help="certificate of the TCP control listener (default: --tls-cert)")
    p.add_argument("--control-tls-key", default=_env("CONTROL_TLS_KEY", ""),
                   help="key of the TCP control listener (default: --tls-key)")
    p.add_argument("--control-tls-client-ca", default=_env("CONTROL_TLS_CLIENT_CA", ""),
                   help="require client certificates on the TCP control listener (mTLS)")
    p.add_argument("--max-concurrent-streams", type=int,
                   default=int(_env("MAX_CONCURRENT_STREAMS", 100)),
                   help="streams one connection may have open; more wait on the client")
    p.add_argument("--keepalive-time", type=float, default=float(_env("KEEPALIVE_TIME", 120)),
                   help="seconds of quiet before the server pings a client")
    p.add_argument("--keepalive-timeout", type=float,
                   default=float(_env("KEEPALIVE_TIMEOUT", 20)),
                   help="seconds to wait for that ping's ack before closing the connection")
    p.add_argument("--min-ping-interval", type=float,
                   default=float(_env("MIN_PING_INTERVAL", 60)),
                   help="least seconds between a client's pings without data; faster ones "
                        "are strikes")
    p.add_argument("--max-ping-strikes", type=int, default=int(_env("MAX_PING_STRIKES", 2)),
                   help="strikes before GOAWAY (ENHANCE_YOUR_CALM, too_many_pings); 0: no limit")
    p.add_argument("--keepalive-permit-without-calls", action="store_true",
                   default=_env_flag("KEEPALIVE_PERMIT_WITHOUT_CALLS"),
                   help="accept client pings on connections with no call open")
    p.add_argument("--max-connection-age", type=float,
                   default=float(_env("MAX_CONNECTION_AGE", 1800)),
                   help="seconds before a connection is asked to go away, so a mesh "
                        "rebalances (0: never)")
    p.add_argument("--max-connection-age-grace", type=float,
                   default=float(_env("MAX_CONNECTION_AGE_GRACE", 300)),
                   help="seconds the streams of an aged connection get to finish")
    p.add_argument("--port-file", default=_env("PORT_FILE", ""),
                   help="write the bound port here once SERVING")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", 0)),
                   help="serve Prometheus metrics on this port (0: off)")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"))
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   default=_env("LOG_FORMAT", "auto"))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    return p


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    defaults = SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    return ServerConfig(
        host=args.host, port=args.port,
        model_dir=Path(args.model_dir) if args.model_dir else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        device=args.device, encoder_device=args.encoder_device,
        kv_reserve_fraction=args.kv_reserve_fraction, dtype=args.dtype,
        served_model_name=args.served_model_name,
        defaults=defaults, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        max_queued=args.max_queued, max_pixels=args.max_pixels, max_batch=args.max_batch,
        pressure_max_pixels=args.pressure_max_pixels,
        encoder_idle_offload_s=args.encoder_idle_offload,
        kv_budget_bytes=int(args.kv_budget_mb * 1024 * 1024),
        kv_budget_fraction=args.kv_budget_fraction,
        activation_budget_bytes=int(args.activation_budget_mb * 1024 * 1024),
        prefix_caching=not args.no_prefix_caching, session_idle_ttl_s=args.session_idle_ttl,
        grace_period_s=args.grace_period, prefill_chunk_tokens=args.prefill_chunk_tokens,
        kv_block_tokens=args.kv_block_tokens, queue_timeout_s=args.queue_timeout,
        watchdog_timeout_s=args.watchdog_timeout, control_socket=args.control_socket,
        control_tcp=args.control_tcp, control_token=args.control_token,
        control_insecure=args.control_insecure,
        tls_cert=_path(args.tls_cert), tls_key=_path(args.tls_key),
        tls_client_ca=_path(args.tls_client_ca),
        control_tls_cert=_path(args.control_tls_cert),
        control_tls_key=_path(args.control_tls_key),
        control_tls_client_ca=_path(args.control_tls_client_ca),
        max_concurrent_streams=args.max_concurrent_streams,
        keepalive_time_s=args.keepalive_time, keepalive_timeout_s=args.keepalive_timeout,
        min_ping_interval_s=args.min_ping_interval, max_ping_strikes=args.max_ping_strikes,
        keepalive_permit_without_calls=args.keepalive_permit_without_calls,
        max_connection_age_s=args.max_connection_age,
        max_connection_age_grace_s=args.max_connection_age_grace,
        port_file=Path(args.port_file) if args.port_file else None,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        log_format=args.log_format, log_level=args.log_level,
    )
