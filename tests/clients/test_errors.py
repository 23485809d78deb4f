"""Mapping of gRPC statuses and trailers to the client's exception classes."""

import grpc
import pytest
from autoglm_client import (
    AuthError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
)
from autoglm_client.errors import error_from_status
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthError),
        (grpc.StatusCode.PERMISSION_DENIED, AuthError),
    ],
)
def test_status_code_selects_exception_class(
    code: grpc.StatusCode, error_class: type[RpcError]
) -> None:
    error = error_from_status(code, "boom", None)
    assert type(error) is error_class
    assert (error.code, error.message) == (code, "boom")
    assert str(error) == f"{code.name}: boom"


def test_unmapped_code_gives_base_class() -> None:
    assert type(error_from_status(grpc.StatusCode.INTERNAL, "x", ())) is RpcError


def test_retry_after_and_request_id_come_from_trailing_metadata() -> None:
    error = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "full",
        [("retry-after-ms", "250"), ("x-request-id", "req-1")],
    )
    assert error.retry_after_s == pytest.approx(0.25)
    assert error.request_id == "req-1"


def test_malformed_retry_after_is_ignored() -> None:
    error = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "full", [("retry-after-ms", "soon")]
    )
    assert error.retry_after_s is None


def test_rich_details_give_retry_info_and_field_violations() -> None:
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3)))
    bad_request = any_pb2.Any()
    bad_request.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="sampling.top_p", description="must be in (0, 1]"
                )
            ]
        )
    )
    details = status_pb2.Status(code=3, message="bad", details=[retry, bad_request])
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad",
        [("grpc-status-details-bin", details.SerializeToString())],
    )
    assert error.retry_after_s == pytest.approx(3.0)
    assert error.field_violations == (("sampling.top_p", "must be in (0, 1]"),)


def test_metadata_retry_hint_wins_over_rich_details() -> None:
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3)))
    details = status_pb2.Status(code=8, details=[retry]).SerializeToString()
    error = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "full",
        [("retry-after-ms", "100"), ("grpc-status-details-bin", details)],
    )
    assert error.retry_after_s == pytest.approx(0.1)


def test_garbage_status_details_do_not_hide_the_error() -> None:
    error = error_from_status(
        grpc.StatusCode.INTERNAL, "oops", [("grpc-status-details-bin", b"\xff\xff\xff")]
    )
    assert error.message == "oops"
    assert error.field_violations == ()


def test_error_info_gives_reason_and_field_when_no_field_violation_names_one() -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="UNKNOWN_SESSION", domain="autoglm.dev",
                                          metadata={"field": "session_id"}))
    details = status_pb2.Status(code=5, details=[info]).SerializeToString()
    error = error_from_status(
        grpc.StatusCode.NOT_FOUND, "no such session", [("grpc-status-details-bin", details)]
    )
    assert (error.reason, error.field) == ("UNKNOWN_SESSION", "session_id")


def test_a_field_violation_names_the_field_before_error_info() -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INVALID", metadata={"field": "sampling"}))
    bad_request = any_pb2.Any()
    bad_request.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="sampling.top_p", description="x")]))
    details = status_pb2.Status(code=3, details=[info, bad_request]).SerializeToString()
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "bad", [("grpc-status-details-bin", details)]
    )
    assert error.field == "sampling.top_p"


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ([("retry-after", "7")], 7.0),  # a proxy's hint, in whole seconds
        ([("retry-after-ms", "0")], 0.0),
        ([("retry-after-ms", "-5"), ("retry-after", "2")], 2.0),
        ([("retry-after-ms", "nan")], None),
    ],
)
def test_retry_hints_in_either_unit_and_unusable_ones_skipped(
    metadata: list[tuple[str, str]], seconds: float | None
) -> None:
    error = error_from_status(grpc.StatusCode.UNAVAILABLE, "down", metadata)
    assert error.retry_after_s == seconds
