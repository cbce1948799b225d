"""The codec: chunk naming, encoding and decoding, verification, sealed and compressed
objects, and how the repository's read path reports what the codec finds."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import xxhash
import zstandard

from lvbackup.base.errors import CorruptionError
from lvbackup.repository.codec import (
    FLAG_RAW,
    FLAG_ZSTD,
    PLAIN,
    Buffer,
    Codec,
    CodecError,
    SealingCodec,
    Verdict,
    block_digest,
    check_block,
    chunk_id,
    compress_object,
    decode_into,
    decompress_object,
    encode,
    seal,
    stored_is_plain,
    unseal,
    verify,
)
from lvbackup.repository.pack import ChunkRef, PackBuilder, pack_name
from lvbackup.repository.repo import ChunkError, Repository

BLOCK = 64 * 1024


def text_block(n: int = BLOCK) -> bytes:
    """Compressible, but not so trivially that every zstd level gives the same frame."""
    words = b" ".join(b"w%d" % (i * 7919 % 1013) for i in range(n))
    return words[:n]


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# --- naming --------------------------------------------------------------------------------

def test_chunk_ids_are_stable() -> None:
    """Chunk ids are on disk in every pack, index and manifest: they must never change."""
    assert chunk_id(b"").hex() == \
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert chunk_id(b"abc").hex() == \
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    block = bytes(range(256)) * 512
    assert chunk_id(block) == blake3.blake3(block).digest()
    assert chunk_id(memoryview(block)[:1000]) == blake3.blake3(block[:1000]).digest()


def test_block_digest_is_the_manifests_xxh3_128() -> None:
    block = text_block()
    assert block_digest(block) == xxhash.xxh3_128_digest(block)
    assert len(block_digest(memoryview(block))) == 16


# --- encoding and decoding -------------------------------------------------------------------

def test_incompressible_block_is_kept_raw_and_not_copied() -> None:
    buf = bytearray(os.urandom(3 * BLOCK))
    block = memoryview(buf)[BLOCK:2 * BLOCK]
    blob, flags = encode(block, 3)
    assert flags == FLAG_RAW and blob is block
    assert stored_is_plain(flags)


def test_compressible_block_is_a_zstd_frame_that_records_its_length() -> None:
    block = text_block()
    blob, flags = encode(memoryview(block), 3)
    assert flags == FLAG_ZSTD and len(blob) < len(block)
    assert not stored_is_plain(flags)
    assert zstandard.frame_content_size(blob) == len(block)
    assert zstandard.ZstdDecompressor().decompress(blob) == block


def test_a_frame_no_smaller_than_the_block_is_not_used() -> None:
    """A frame that saves nothing is not stored: it would only cost a decompression."""
    block = os.urandom(200)
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(block)
    assert len(frame) >= len(block)
    assert encode(block, 3) == (block, FLAG_RAW)


def test_level_may_change_between_calls_on_one_thread() -> None:
    block = text_block()
    frames = {level: encode(block, level)[0] for level in (1, 19, 1, 7)}
    for level, frame in frames.items():
        want = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(block)
        assert frame == want, f"level {level} was not the one used"
    assert frames[1] != frames[19]


def test_threads_encode_and_decode_at_their_own_levels() -> None:
    blocks = [text_block(BLOCK - i * 100) for i in range(8)]
    errors: list[BaseException] = []

    def work(level: int) -> None:
        try:
            for _ in range(20):
                for block in blocks:
                    blob, flags = encode(block, level)
                    out = memoryview(bytearray(len(block)))
                    decode_into(blob, flags, out)
                    assert out == block
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(level,)) for level in (1, 3, 9, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("kind", ["text", "random", "one byte"])
def test_round_trip_into_a_view_of_a_larger_buffer(kind: str) -> None:
    block = {"text": text_block(), "random": os.urandom(BLOCK), "one byte": b"x"}[kind]
    blob, flags = encode(memoryview(block), 1)
    buf = bytearray(b"\xee" * (len(block) + 20))
    decode_into(blob, flags, memoryview(buf)[10:10 + len(block)])
    assert buf[10:10 + len(block)] == block
    assert buf[:10] == buf[-10:] == b"\xee" * 10, "bytes around the view are untouched"


def test_decode_errors_are_corruption() -> None:
    assert issubclass(CodecError, CorruptionError)


@pytest.mark.parametrize("cut", [0, 1, 5, 0.5, -1])
def test_truncated_zstd_frame_is_refused(cut: int | float) -> None:
    block = text_block()
    blob = encode(block, 3)[0]
    end = int(len(blob) * cut) if isinstance(cut, float) else cut % len(blob)
    with pytest.raises(CodecError):
        decode_into(blob[:end], FLAG_ZSTD, memoryview(bytearray(len(block))))


def test_garbage_frame_does_not_decompress() -> None:
    with pytest.raises(CodecError, match="does not decompress"):
        decode_into(os.urandom(1000), FLAG_ZSTD, memoryview(bytearray(BLOCK)))


@pytest.mark.parametrize("delta", [-1, 1, -BLOCK // 2])
def test_frame_that_decodes_to_the_wrong_length_is_refused(delta: int) -> None:
    block = text_block()
    blob = encode(block, 3)[0]
    with pytest.raises(CodecError, match="decompresses to"):
        decode_into(blob, FLAG_ZSTD, memoryview(bytearray(len(block) + delta)))


def test_frame_that_does_not_record_its_length_must_still_fit_exactly() -> None:
    block = text_block()
    streamed = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(streamed, closefd=False) as w:
        w.write(block)
    blob = streamed.getvalue()
    out = memoryview(bytearray(len(block)))
    decode_into(blob, FLAG_ZSTD, out)
    assert out == block
    with pytest.raises(CodecError, match="decompresses to"):
        decode_into(blob, FLAG_ZSTD, memoryview(bytearray(len(block) - 1)))


@pytest.mark.parametrize("delta", [-1, 1])
def test_raw_blob_of_the_wrong_length_is_refused(delta: int) -> None:
    with pytest.raises(CodecError, match="stored raw"):
        decode_into(bytes(100), FLAG_RAW, memoryview(bytearray(100 + delta)))


@pytest.mark.parametrize("flags", [2, 255])
def test_unknown_flags_are_refused(flags: int) -> None:
    assert not stored_is_plain(flags)
    with pytest.raises(CodecError, match=f"unknown flags {flags}"):
        decode_into(bytes(100), flags, memoryview(bytearray(100)))


# --- verification ----------------------------------------------------------------------------

def test_verify_catches_any_flipped_bit() -> None:
    block = os.urandom(512)
    cid = chunk_id(block)
    assert verify(block, cid) and verify(memoryview(block), cid)
    for bit in range(len(block) * 8):
        assert not verify(flip(block, bit), cid)


def test_check_block_trusts_the_digest_then_the_id() -> None:
    """The block digest from a manifest is checked first (it is cheap); only when it
    disagrees does the id decide whether the chunk itself is damaged."""
    block = text_block()
    cid, digest = chunk_id(block), block_digest(block)
    other = flip(block, 3)
    assert check_block(block, cid, digest) is Verdict.SOUND
    assert check_block(block, cid, None) is Verdict.SOUND
    assert check_block(block, cid, bytes(16)) is Verdict.DIGEST_MISMATCH
    assert check_block(other, cid, digest) is Verdict.DAMAGED
    assert check_block(other, cid, None) is Verdict.DAMAGED
    assert check_block(block, chunk_id(other), digest) is Verdict.SOUND, \
        "a matching digest is the end-to-end check: the id is not read again"


# --- whole objects ---------------------------------------------------------------------------

def test_seal_layout() -> None:
    payload = b'{"x": 1}'
    data = seal(b"TESTMAG1", payload)
    assert data == b"TESTMAG1" + payload + blake3.blake3(b"TESTMAG1" + payload).digest()
    assert seal(b"TESTMAG1", memoryview(payload)) == data
    assert unseal(b"TESTMAG1", data, "thing") == payload


def test_unseal_refuses_the_wrong_magic() -> None:
    data = seal(b"TESTMAG1", b"payload")
    with pytest.raises(CodecError, match=r"thing is corrupt \(bad header"):
        unseal(b"OTHERMG1", data, "thing")


@pytest.mark.parametrize("cut", [0, 8, 39, -1])
def test_unseal_refuses_a_truncated_object(cut: int) -> None:
    data = seal(b"TESTMAG1", b"payload")
    with pytest.raises(CodecError, match="thing is corrupt"):
        unseal(b"TESTMAG1", data[:cut], "thing")


def test_unseal_refuses_a_flipped_bit() -> None:
    data = seal(b"TESTMAG1", b"payload")
    for bit in range(64, len(data) * 8):   # past the magic, which is refused as a header
        with pytest.raises(CodecError, match=r"thing is corrupt \(checksum mismatch\)"):
            unseal(b"TESTMAG1", flip(data, bit), "thing")


@pytest.mark.parametrize("payload", [b"", b"x", bytes(1 << 20), os.urandom(5000)])
def test_object_round_trip(payload: bytes) -> None:
    data = compress_object(payload)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == payload, \
        "one plain zstd frame"
    assert decompress_object(data, "thing") == payload
    assert decompress_object(memoryview(data), "thing") == payload


def test_object_frame_without_its_length_is_read() -> None:
    """Manifests have been written as a stream, whose frame does not record its length."""
    payload = text_block()
    streamed = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(streamed, closefd=False) as w:
        w.write(payload)
    assert zstandard.frame_content_size(streamed.getvalue()) == -1
    assert decompress_object(streamed.getvalue(), "thing") == payload


@pytest.mark.parametrize("damage", ["truncated", "garbage", "trailing bytes", "empty"])
def test_object_damage_is_refused(damage: str) -> None:
    data = compress_object(text_block())
    bad = {"truncated": data[:len(data) // 2], "garbage": os.urandom(len(data)),
           "trailing bytes": data + b"\0", "empty": b""}[damage]
    with pytest.raises(CodecError, match="thing is corrupt"):
        decompress_object(bad, "thing")


# --- the repository's read path ----------------------------------------------------------------

@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", 65536)
    yield r
    r.close()


def _store(repo: Repository, chunks: list[tuple[bytes, Buffer, int, int]]) -> list[ChunkRef]:
    """Store (chunk id, blob, plaintext length, flags) in one pack; their refs."""
    builder = PackBuilder(1 << 20, PLAIN.trailer_digest)
    for cid, blob, length, flags in chunks:
        builder.add(cid, blob, length, flags)
    pack_id, data, refs = builder.finish()
    repo.storage.put(pack_name(pack_id), bytes(data))
    return refs


def test_read_path_reads_both_encodings_back_to_back(repo: Repository) -> None:
    blocks = [os.urandom(BLOCK), text_block(), text_block(1000), os.urandom(10)]
    encoded = [encode(b, 3) for b in blocks]
    assert [f for _, f in encoded] == [FLAG_RAW, FLAG_ZSTD, FLAG_ZSTD, FLAG_RAW]
    refs = _store(repo, [(chunk_id(b), blob, len(b), f)
                         for b, (blob, f) in zip(blocks, encoded, strict=True)])
    outs = [memoryview(bytearray(len(b))) for b in blocks]
    repo.read_chunks_into([(r, o, block_digest(b))
                           for r, o, b in zip(refs, outs, blocks, strict=True)])
    assert [bytes(o) for o in outs] == blocks


@pytest.mark.parametrize("damage", ["garbage", "wrong length", "unknown flags"])
def test_read_path_reports_what_the_codec_refuses_as_damage(repo: Repository,
                                                           damage: str) -> None:
    block = text_block()
    blob = {"garbage": os.urandom(1000), "wrong length": encode(block[:-1], 3)[0],
            "unknown flags": encode(block, 3)[0]}[damage]
    flags = 7 if damage == "unknown flags" else FLAG_ZSTD
    (ref,) = _store(repo, [(chunk_id(block), blob, len(block), flags)])
    with pytest.raises(ChunkError) as e:
        repo.read_chunk(ref)
    assert e.value.damaged and ref.chunk_id.hex() in str(e.value)


# --- encrypting codecs ------------------------------------------------------------------------

def test_sealing_codec_round_trip_and_binding() -> None:
    """Keyed ids; blobs open only under their own id and flags; sealed objects only under
    their own name, in their own repository."""
    a, b = SealingCodec(os.urandom(32), "repo-a"), SealingCodec(os.urandom(32), "repo-a")
    for block in (text_block(), os.urandom(BLOCK)):
        cid = a.chunk_id(block)
        assert cid != chunk_id(block) and cid != b.chunk_id(block)
        blob, flags = a.encode(cid, block, 3)
        assert block[:64] not in bytes(blob) and not a.stored_is_plain(flags)
        out = memoryview(bytearray(len(block)))
        a.decode_into(cid, blob, flags, out)
        assert bytes(out) == block and a.check_block(out, cid, None) is Verdict.SOUND
        for bad_id, bad_blob, bad_flags in ((a.chunk_id(b"x"), blob, flags),
                                            (cid, flip(bytes(blob), 200), flags),
                                            (cid, blob, flags ^ 1), (cid, blob[:20], flags)):
            with pytest.raises(CodecError):
                a.decode_into(bad_id, bad_blob, bad_flags, memoryview(bytearray(len(block))))
        with pytest.raises(CodecError):
            b.decode_into(cid, blob, flags, memoryview(bytearray(len(block))))
    sealed = a.seal(b"TESTMAG1", b"payload", "manifests/one")
    assert a.unseal(b"TESTMAG1", sealed, "thing", "manifests/one") == b"payload"
    for name, codec in (("manifests/two", a), ("manifests/one", b)):
        with pytest.raises(CodecError, match="thing is corrupt"):
            codec.unseal(b"TESTMAG1", sealed, "thing", name)
    other_repo = SealingCodec(b"\x01" * 32, "repo-b")
    same_key = SealingCodec(b"\x01" * 32, "repo-a")
    with pytest.raises(CodecError):
        other_repo.unseal(b"TESTMAG1", same_key.seal(b"TESTMAG1", b"p", "n"), "thing", "n")


def test_same_ids_only_between_codecs_that_name_chunks_alike() -> None:
    """copy keeps ids only where same_ids() says so; everywhere else it renames chunks."""
    master = os.urandom(32)
    a, twin, other = (SealingCodec(master, "a"), SealingCodec(master, "b"),
                      SealingCodec(os.urandom(32), "a"))
    assert PLAIN.same_ids(Codec()) and a.same_ids(twin) and twin.same_ids(a)
    assert not PLAIN.same_ids(a) and not a.same_ids(PLAIN) and not a.same_ids(other)
    block = text_block()
    assert a.chunk_id(block) == twin.chunk_id(block) != other.chunk_id(block)
    assert PLAIN.chunk_id(block) not in (a.chunk_id(block), other.chunk_id(block))
