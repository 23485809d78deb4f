"""Channel construction and per-call options shared by every client in this package."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc

from autoglm_client.errors import REQUEST_ID_KEY, InputError

SESSION_ID_KEY = "x-session-id"  # the header proxies hash for session affinity

# The server accepts messages up to 32 MiB; the client allows twice that so that the
# server, not the client, is the one to reject an oversized request with a clear status.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TARGET = "127.0.0.1:50051"

MetadataPairs = tuple[tuple[str, str], ...]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: the CA that signed the server's certificate (None:
    the system's roots), and for mTLS the client's certificate chain and key."""
    if (cert_file is None) != (key_file is None):
        raise InputError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA"),
        private_key=_read(key_file, "client key"),
        certificate_chain=_read(cert_file, "client certificate"),
    )


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"cannot read the {what} file {path}: {error.strerror}") from error


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    options = channel_options(max_message_bytes)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def open_aio_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    options = channel_options(max_message_bytes)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


@dataclass(frozen=True, slots=True)
class CallDefaults:
    """Deadline and metadata applied to every call of a client unless a call overrides them."""

    timeout: float | None = None
    metadata: MetadataPairs = ()

    @classmethod
    def of(cls, timeout: float | None, metadata: Iterable[tuple[str, str]]) -> CallDefaults:
        return cls(timeout, tuple(metadata))

    def call_kwargs(
        self, timeout: float | None, request_id: str | None, session_id: str | None = None
    ) -> dict[str, object]:
        """Keyword arguments for a stub call: its timeout and metadata.

        A session id also travels as `x-session-id` metadata, so that a proxy in front of
        several replicas (deploy/nginx) sends every turn of a session to the same one.
        """
        metadata = self.metadata
        if request_id:
            metadata = (*metadata, (REQUEST_ID_KEY, request_id))
        if session_id:
            metadata = (*metadata, (SESSION_ID_KEY, session_id))
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": metadata or None,
        }


class ClosesChannel:
    """A blocking client that owns its channel: `close()` or a `with` block closes it."""

    _channel: grpc.Channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
