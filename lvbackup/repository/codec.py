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

The module functions are those unencrypted primitives. A repository reads and writes
through its `Codec`: `Codec` itself is the unencrypted repository's, `SealingCodec` an
encrypted one's (keyed BLAKE3 chunk ids; every blob and sealed object AES-256-GCM under a
random 96-bit nonce, with associated data that binds it to its name and repository; pack
trailers authenticated by a keyed BLAKE3). `same_ids()` tells whether two repositories name
chunks alike, so that `copy` between them keeps every id.
"""

from __future__ import annotations

import enum
import hmac
import os
import threading
from collections.abc import Callable
from typing import TypeAlias

import blake3
import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..base.errors import CorruptionError

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


def check_block(plain: Buffer, cid: bytes, digest: bytes | None,
                verify_id: Callable[[Buffer, bytes], bool] = verify) -> Verdict:
    """Check a chunk's decoded plaintext against the block digest given with it (from a
    manifest) or, given None, against its id (with `verify_id`). A digest that disagrees
    does not by itself make the chunk damaged: only failing its id does, so the id is
    consulted before the chunk is called damaged."""
    if digest is not None and block_digest(plain) == digest:
        return Verdict.SOUND
    if not verify_id(plain, cid):
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


# --- a repository's codec ------------------------------------------------------------------

NONCE_LEN = 12
TAG_LEN = 16
SEAL_OVERHEAD = NONCE_LEN + TAG_LEN
# Subkeys of the repository's master key (BLAKE3 derive_key contexts: docs/format.md).
DATA_KEY_CONTEXT = "lvbackup 2026-12 AES-256-GCM data key"
ID_KEY_CONTEXT = "lvbackup 2026-12 BLAKE3 chunk id key"
MAC_KEY_CONTEXT = "lvbackup 2026-12 BLAKE3 pack trailer key"
CHECK_CONTEXT = "lvbackup 2026-12 master key check"


class Codec:
    """An unencrypted repository's codec: BLAKE3 ids, blobs as encode() makes them, the
    BLAKE3 envelope for sealed objects and pack trailers. Names given to seal/unseal and
    chunk ids given to encode/decode are what an encrypting codec binds the bytes to."""

    encrypted = False

    def chunk_id(self, block: Buffer) -> bytes:
        return chunk_id(block)

    def encode(self, cid: bytes, block: Buffer, level: int) -> tuple[Buffer, int]:
        return encode(block, level)

    def stored_is_plain(self, flags: int) -> bool:
        return stored_is_plain(flags)

    def decode_into(self, cid: bytes, blob: Buffer, flags: int, out: memoryview) -> None:
        decode_into(blob, flags, out)

    def verify(self, plain: Buffer, cid: bytes) -> bool:
        return self.chunk_id(plain) == cid

    def check_block(self, plain: Buffer, cid: bytes, digest: bytes | None) -> Verdict:
        return check_block(plain, cid, digest, self.verify)

    def seal(self, magic: bytes, payload: Buffer, name: str) -> bytes:
        return seal(magic, payload)

    def unseal(self, magic: bytes, data: bytes, what: str, name: str) -> bytes:
        return unseal(magic, data, what)

    def trailer_digest(self, trailer: Buffer) -> bytes:
        """The digest that names a pack and checks its trailer."""
        return blake3.blake3(trailer).digest()

    def same_ids(self, other: Codec) -> bool:
        """Whether `other` names every chunk as this codec does (both unencrypted, or both
        keyed by the same master key): then a copy between their repositories keeps every
        chunk and page id, and no manifest's entries need rewriting."""
        return not other.encrypted


PLAIN = Codec()


def derive(master: bytes, context: str) -> bytes:
    return blake3.blake3(master, derive_key_context=context).digest()


class SealingCodec(Codec):
    """An encrypted repository's codec, from its 32-byte master key.

    Every blob is nonce | AES-256-GCM(plaintext-or-zstd-frame) with the chunk id and flags
    as associated data, so a blob moved under another id fails. Sealed objects are
    magic | nonce | AES-256-GCM(payload), associated data magic | repository id | object
    name, so an object of another repository or under another name fails."""

    encrypted = True

    def __init__(self, master: bytes, repo_id: str):
        self._aead = AESGCM(derive(master, DATA_KEY_CONTEXT))
        self._id_key = derive(master, ID_KEY_CONTEXT)
        self._mac_key = derive(master, MAC_KEY_CONTEXT)
        self._repo = repo_id.encode()

    def chunk_id(self, block: Buffer) -> bytes:
        return blake3.blake3(block, key=self._id_key).digest()

    def encode(self, cid: bytes, block: Buffer, level: int) -> tuple[Buffer, int]:
        inner, flags = encode(block, level)
        nonce = os.urandom(NONCE_LEN)
        blob = bytearray(len(inner) + SEAL_OVERHEAD)
        blob[:NONCE_LEN] = nonce
        self._aead.encrypt_into(nonce, inner, cid + bytes((flags,)), memoryview(blob)[NONCE_LEN:])
        return blob, flags

    def stored_is_plain(self, flags: int) -> bool:
        return False

    def decode_into(self, cid: bytes, blob: Buffer, flags: int, out: memoryview) -> None:
        if len(blob) < SEAL_OVERHEAD:
            raise CodecError(f"is truncated ({len(blob)} bytes)")
        view = memoryview(blob)
        nonce, aad = bytes(view[:NONCE_LEN]), cid + bytes((flags,))
        try:
            if flags == FLAG_RAW:
                if len(blob) - SEAL_OVERHEAD != len(out):
                    raise CodecError(f"is stored raw in {len(blob) - SEAL_OVERHEAD} bytes, "
                                     f"not {len(out)}")
                self._aead.decrypt_into(nonce, view[NONCE_LEN:], aad, out)
                return
            inner = self._aead.decrypt(nonce, view[NONCE_LEN:], aad)
        except InvalidTag:
            raise CodecError("fails authentication (damaged, or not this chunk)") from None
        decode_into(inner, flags, out)

    def seal(self, magic: bytes, payload: Buffer, name: str) -> bytes:
        assert len(magic) == 8
        nonce = os.urandom(NONCE_LEN)
        return magic + nonce + self._aead.encrypt(nonce, payload, self._aad(magic, name))

    def unseal(self, magic: bytes, data: bytes, what: str, name: str) -> bytes:
        if len(data) < len(magic) + SEAL_OVERHEAD or not data.startswith(magic):
            raise CodecError(f"{what} is corrupt (bad header or truncated)")
        nonce = data[len(magic):len(magic) + NONCE_LEN]
        try:
            return self._aead.decrypt(nonce, data[len(magic) + NONCE_LEN:],
                                      self._aad(magic, name))
        except InvalidTag:
            raise CodecError(f"{what} is corrupt (fails authentication: damaged, or not "
                             "written under this name in this repository)") from None

    def _aad(self, magic: bytes, name: str) -> bytes:
        return magic + self._repo + b"\0" + name.encode()

    def trailer_digest(self, trailer: Buffer) -> bytes:
        return blake3.blake3(trailer, key=self._mac_key).digest()

    def same_ids(self, other: Codec) -> bool:
        return isinstance(other, SealingCodec) and hmac.compare_digest(self._id_key,
                                                                        other._id_key)


def key_check(master: bytes) -> str:
    """A value stored in the repository's config that tells whether an unwrapped master
    key is this repository's (hex)."""
    return derive(master, CHECK_CONTEXT).hex()
