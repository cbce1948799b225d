"""How data becomes stored bytes and back: a block into a chunk blob, and a small object's
payload into its stored form.

Every transformation between plaintext and what the repository holds belongs here (naming,
compression, checksums, the sealed envelope), so that a new stage such as encryption is a
change to this module alone. Callers see flags, blobs and verdicts, never the algorithms.

The on-disk encodings (docs/format.md):

- chunk: named by BLAKE3-256 of its plaintext; stored as a zstd frame that records the
  plaintext's length (FLAG_ZSTD), or as the plaintext itself when zstd would not make it
  smaller (FLAG_RAW);
- sealed object: 8-byte magic | payload | BLAKE3-256 of both;
- compressed object payload: one zstd frame.
"""

from __future__ import annotations

import enum
import threading
from typing import TypeAlias

import blake3
import xxhash
import zstandard

from ..errors import CorruptionError

FLAG_RAW = 0
FLAG_ZSTD = 1

_HASH_LEN = 32
_OBJECT_LEVEL = 3   # zstd's default: objects are small, their ratio matters more than speed

Buffer: TypeAlias = bytes | bytearray | memoryview


class CodecError(CorruptionError):
    """Stored bytes that do not decode to what they should.

    decode_into's messages are phrased to follow the name of what was decoded ("chunk …
    does not decompress"); unseal's and decompress_object's name it themselves."""


class Verdict(enum.Enum):
    """What a chunk's plaintext is, checked against its id and its block's digest."""

    SOUND = "sound"
    DAMAGED = "damaged"                  # fails its id: this stored copy is bad
    DIGEST_MISMATCH = "digest mismatch"  # the chunk is sound, the block's digest disagrees


# zstd contexts must not be shared between threads, and making one per call costs more than
# compressing a small block, so each thread keeps its own.
_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cctxs: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "cctxs", None)
    if cctxs is None:
        cctxs = _tls.cctxs = {}
    cctx = cctxs.get(level)
    if cctx is None:
        cctx = cctxs[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor()
    return dctx


# --- chunks ---------------------------------------------------------------------------

def chunk_id(block: Buffer) -> bytes:
    """The name of the chunk holding `block` (32 bytes)."""
    return blake3.blake3(block).digest()


def encode(block: Buffer, level: int) -> tuple[Buffer, int]:
    """(blob, flags) storing `block`: a zstd frame at `level` if that is smaller, else
    `block` itself, not copied (a view stays a view of the caller's buffer)."""
    blob = _compressor(level).compress(block)
    if len(blob) < len(block):
        return blob, FLAG_ZSTD
    return block, FLAG_RAW


def stored_is_plain(flags: int) -> bool:
    """Whether a blob with these flags is the plaintext itself, so that a reader may read
    it straight into the output buffer and skip decode_into."""
    return flags == FLAG_RAW


def decode_into(blob: Buffer, flags: int, out: memoryview) -> None:
    """Fill `out` with the plaintext of `blob`, which must be exactly len(out) bytes;
    CodecError if the flags are unknown, the frame is bad or the length is wrong."""
    if flags == FLAG_RAW:
        if len(blob) != len(out):
            raise CodecError(f"is stored raw in {len(blob)} bytes, not {len(out)}")
        out[:] = blob
        return
    if flags != FLAG_ZSTD:
        raise CodecError(f"has unknown flags {flags}")
    try:
        # Decompressing in place costs no intermediate copy of the plaintext.
        reader = _decompressor().stream_reader(blob)
        got = 0
        while got < len(out) and (n := reader.readinto(out[got:])):
            got += n
        # Reading past a full buffer is what tells a frame that decodes to more bytes from
        # one that fits exactly.
        longer = got == len(out) and reader.read(1)
    except zstandard.ZstdError:
        raise CodecError("does not decompress") from None
    if longer:
        raise CodecError(f"decompresses to more than {len(out)} bytes")
    if got != len(out):
        raise CodecError(f"decompresses to {got} bytes, not {len(out)}")


def block_digest(block: Buffer) -> bytes:
    """The digest a manifest records for a block (xxh3-128, 16 bytes): far cheaper than
    chunk_id, it finds unchanged blocks and checks restored ones end to end."""
    return xxhash.xxh3_128_digest(block)


def verify(plain: Buffer, cid: bytes) -> bool:
    """Whether `plain` is the plaintext of the chunk named `cid`."""
    return chunk_id(plain) == cid


def check_block(plain: Buffer, cid: bytes, digest: bytes | None) -> Verdict:
    """Check a chunk's decoded plaintext against the block digest given with it (from a
    manifest) or, given None, against its id. A digest that disagrees does not by itself
    make the chunk damaged: only failing its id does, so the id is consulted before the
    chunk is called damaged."""
    if digest is not None and block_digest(plain) == digest:
        return Verdict.SOUND
    if not verify(plain, cid):
        return Verdict.DAMAGED
    return Verdict.SOUND if digest is None else Verdict.DIGEST_MISMATCH


# --- whole objects ----------------------------------------------------------------------

def seal(magic: bytes, payload: Buffer) -> bytes:
    """The stored bytes of a small object: magic, payload and a BLAKE3 of both, so that a
    flipped bit, a truncation or a file of the wrong kind is detected on read."""
    assert len(magic) == 8
    body = magic + payload
    return body + blake3.blake3(body).digest()


def unseal(magic: bytes, data: bytes, what: str) -> bytes:
    """The payload of a sealed object, or CodecError naming `what`."""
    if len(data) < len(magic) + _HASH_LEN or not data.startswith(magic):
        raise CodecError(f"{what} is corrupt (bad header or truncated)")
    body, digest = data[:-_HASH_LEN], data[-_HASH_LEN:]
    if blake3.blake3(body).digest() != digest:
        raise CodecError(f"{what} is corrupt (checksum mismatch)")
    return body[len(magic):]


def compress_object(payload: Buffer) -> bytes:
    """One zstd frame holding `payload`."""
    return _compressor(_OBJECT_LEVEL).compress(payload)


def decompress_object(data: Buffer, what: str) -> bytes:
    """The payload of the single zstd frame `data`, or CodecError naming `what`.

    The frame need not record its length: manifests written as a stream have frames that
    do not."""
    dobj = _decompressor().decompressobj()
    try:
        payload = dobj.decompress(data)
    except zstandard.ZstdError:
        raise CodecError(f"{what} is corrupt (bad zstd frame)") from None
    if not dobj.eof:
        raise CodecError(f"{what} is corrupt (truncated zstd frame)")
    if dobj.unused_data:
        raise CodecError(f"{what} is corrupt (bytes after its zstd frame)")
    return payload
