"""A safetensors file's tensor table, read from its header without touching the data."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file: 8-byte little-endian length, then JSON."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header
