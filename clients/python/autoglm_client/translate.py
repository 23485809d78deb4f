"""One place where grpcio exceptions become this package's exceptions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from autoglm_client.errors import error_from_rpc_error


@contextmanager
def rpc_errors_translated() -> Iterator[None]:
    """Re-raise any grpc.RpcError (sync or aio) inside the block as an `RpcError`."""
    try:
        yield
    except grpc.RpcError as error:
        raise error_from_rpc_error(error) from None
