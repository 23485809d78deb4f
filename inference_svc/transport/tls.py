"""Server credentials of a listener from its PEM files."""

from __future__ import annotations

import grpc

from inference_svc.config import TlsFiles


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS with `files.cert`/`files.key`; with `files.client_ca`, client certificates
    signed by it are required."""
    client_ca = files.client_ca.read_bytes() if files.client_ca else None
    return grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def add_port(server: grpc.aio.Server, address: str, files: TlsFiles | None) -> int:
    """Listen on `address`, over TLS when `files` are given; returns the bound port."""
    if files is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(files))
