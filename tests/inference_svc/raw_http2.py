"""A bare HTTP/2 gRPC caller for requests a gRPC client library refuses to send.

grpc-core checks metadata before sending (a non-ASCII value ends the call locally with
INTERNAL "Invalid metadata"), so a hostile peer's headers have to be written by hand. This
sends one unary-stream call on a fresh connection with HPACK literals and decodes the
reply's headers enough to read grpc-status and grpc-message (grpc-core sends those
without Huffman coding; a Huffman-coded value reads as None).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
STATIC_TABLE_SIZE = 61


@dataclass
class RawReply:
    """What came back on the stream: headers and trailers, gRPC messages, or a reset."""

    headers: dict[str, bytes | None] = field(default_factory=dict)
    messages: list[bytes] = field(default_factory=list)
    reset_code: int | None = None
    goaway: bool = False

    @property
    def grpc_status(self) -> int | None:
        value = self.headers.get("grpc-status")
        return int(value) if value is not None else None

    @property
    def grpc_message(self) -> str:
        return (self.headers.get("grpc-message") or b"").decode("utf-8", "replace")


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append((value % 128) | 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) \
        + payload


class _HpackReader:
    def __init__(self) -> None:
        self.dynamic: list[tuple[str, bytes | None]] = []  # newest first

    def _read_int(self, data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 127) << shift
            shift += 7
            if not byte & 128:
                return value, pos

    def _read_str(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        huffman = bool(data[pos] & 0x80)
        length, pos = self._read_int(data, pos, 7)
        raw = data[pos:pos + length]
        return (None if huffman else raw), pos + length

    def _entry(self, index: int) -> tuple[str, bytes | None]:
        if index <= STATIC_TABLE_SIZE:
            return f":static{index}", None
        return self.dynamic[index - STATIC_TABLE_SIZE - 1]

    def decode(self, block: bytes) -> dict[str, bytes | None]:
        headers: dict[str, bytes | None] = {}
        pos = 0
        while pos < len(block):
            byte = block[pos]
            if byte & 0x80:
                index, pos = self._read_int(block, pos, 7)
                name, value = self._entry(index)
            elif byte & 0xE0 == 0x20:
                _, pos = self._read_int(block, pos, 5)
                continue
            else:
                indexing = byte & 0xC0 == 0x40
                index, pos = self._read_int(block, pos, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    raw_name, pos = self._read_str(block, pos)
                    name = (raw_name or b"?").decode("latin-1")
                value, pos = self._read_str(block, pos)
                if indexing:
                    self.dynamic.insert(0, (name, value))
            headers[name] = value
        return headers


def call_unary_stream(
    host: str, port: int, path: str, message: bytes, metadata: list[tuple[bytes, bytes]],
    *, timeout: float = 30.0,
) -> RawReply:
    """One call with exactly these metadata bytes; reads until the stream ends."""
    headers = b"".join(_literal(k, v) for k, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
        (b":authority", f"{host}:{port}".encode()), (b"content-type", b"application/grpc"),
        (b"te", b"trailers"), (b"grpc-timeout", f"{int(timeout)}S".encode()), *metadata,
    ])
    body = b"\x00" + struct.pack(">I", len(message)) + message
    reply, reader, pending = RawReply(), _HpackReader(), b""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0) + _frame(HEADERS, END_HEADERS, 1, headers)
                     + _frame(DATA, END_STREAM, 1, body))
        buffer = b""
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            buffer += chunk
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags = buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                if kind == SETTINGS and not flags & ACK:
                    sock.sendall(_frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    sock.sendall(_frame(PING, ACK, 0, payload))
                elif kind == GOAWAY:
                    reply.goaway = True
                elif stream != 1:
                    continue
                elif kind == HEADERS:
                    reply.headers.update(reader.decode(payload))
                elif kind == DATA:
                    pending += payload
                    while len(pending) >= 5 and len(pending) >= 5 + int.from_bytes(pending[1:5],
                                                                                    "big"):
                        size = int.from_bytes(pending[1:5], "big")
                        reply.messages.append(pending[5:5 + size])
                        pending = pending[5 + size:]
                elif kind == RST_STREAM:
                    reply.reset_code = int.from_bytes(payload[:4], "big")
                    return reply
                if stream == 1 and kind in (HEADERS, DATA) and flags & END_STREAM:
                    return reply
    raise TimeoutError(f"no end of stream within {timeout}s")
