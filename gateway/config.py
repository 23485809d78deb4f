"""Gateway settings, built once at the edge from flags and environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "autoglm-phone-9b"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    """Everything the gateway needs to serve; validated on construction."""

    upstream_target: str = "127.0.0.1:50051"
    # TLS to the service: its certificate's CA (PEM); a client certificate and key when it
    # wants mTLS. Any of them turns TLS on.
    upstream_tls_ca: Path | None = None
    upstream_tls_cert: Path | None = None
    upstream_tls_key: Path | None = None
    served_model_name: str = DEFAULT_MODEL_NAME
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # gRPC deadline per generation; None leaves generations unbounded.
    request_timeout_s: float | None = None
    health_timeout_s: float = 2.0
    # Retry-After sent with 429/503 when the service gives no hint of its own.
    default_retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not self.upstream_target:
            raise ValueError("upstream_target must not be empty")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.api_key == "":
            raise ValueError("api_key must be None (auth off) or a non-empty string")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s must be positive, got {self.health_timeout_s}")
        if self.default_retry_after_s < 0:
            raise ValueError("default_retry_after_s must not be negative")
        if (self.upstream_tls_cert is None) != (self.upstream_tls_key is None):
            raise ValueError("upstream_tls_cert and upstream_tls_key go together")
        for path in (self.upstream_tls_ca, self.upstream_tls_cert, self.upstream_tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")

    @property
    def upstream_tls(self) -> bool:
        return self.upstream_tls_ca is not None or self.upstream_tls_cert is not None
