"""What a request id may look like: what the service accepts and gRPC metadata can carry.

The service and the HTTP gateway check every `x-request-id` they receive with it.
"""

from __future__ import annotations

import re

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


def is_request_id(value: object) -> bool:
    return isinstance(value, str) and REQUEST_ID.fullmatch(value) is not None
