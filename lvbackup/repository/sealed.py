"""The envelope of every small repository file: 8-byte magic, payload, BLAKE3-256 of both.

A flipped bit anywhere, a truncation or a file of the wrong kind is detected on read.
"""

from __future__ import annotations

import blake3

from ..errors import CorruptionError

HASH_LEN = 32


def seal(magic: bytes, payload: bytes) -> bytes:
    assert len(magic) == 8
    body = magic + payload
    return body + blake3.blake3(body).digest()


def unseal(magic: bytes, data: bytes, what: str) -> bytes:
    """The payload of a sealed file, or CorruptionError naming `what`."""
    if len(data) < len(magic) + HASH_LEN or not data.startswith(magic):
        raise CorruptionError(f"{what} is corrupt (bad header or truncated)")
    body, digest = data[:-HASH_LEN], data[-HASH_LEN:]
    if blake3.blake3(body).digest() != digest:
        raise CorruptionError(f"{what} is corrupt (checksum mismatch)")
    return body[len(magic):]
