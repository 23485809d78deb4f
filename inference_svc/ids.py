"""What session ids may look like (request ids: `autoglm_common.ids`)."""

from __future__ import annotations

import re

from autoglm_common.bounds import quote
from inference_svc.errors import InvalidRequest

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_session_id(value: str, *, field: str = "session_id") -> str:
    """`value` if it is a valid session id; else InvalidRequest naming `field`."""
    if not SESSION_ID.fullmatch(value):
        raise InvalidRequest(
            f"{field} must be 1-128 characters of [A-Za-z0-9._:-], got {quote(value, 40)}",
            field=field,
        )
    return value
