"""The one definition of what session ids and request ids may look like."""

from __future__ import annotations

import re

from inference_svc.bounds import quote
from inference_svc.errors import InvalidRequest

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: fits metadata


def check_session_id(value: str, *, field: str = "session_id") -> str:
    """`value` if it is a valid session id; else InvalidRequest naming `field`."""
    if not SESSION_ID.fullmatch(value):
        raise InvalidRequest(
            f"{field} must be 1-128 characters of [A-Za-z0-9._:-], got {quote(value, 40)}",
            field=field,
        )
    return value


def is_request_id(value: object) -> bool:
    return isinstance(value, str) and REQUEST_ID.fullmatch(value) is not None
