"""The repository: its config file, chunk reads, and the packer that stores new chunks.

Objects in a repository (all names relative to its root):

    config                  sealed "LVBREPO1", JSON {version, id, block_size, created_at,
                            and for an encrypted repository (version 2) encryption}
    keys/<slot id>          an encrypted repository's key slots (keys.py)
    packs/<xx>/<pack id>    pack files (pack.py)
    index/<hash>            index files (index.py)
    manifests/<backup id>   one per available backup (manifest.py)
    damaged/<chunk>.<pack>  a copy of a chunk found damaged (Repository.quarantine)
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ..base.diskio import ALIGN
from ..base.errors import CorruptionError, UsageError
from ..base.faults import crash_point
from ..base.locks import run_is_alive
from ..base.timeutil import now_iso
from ..config import S3Settings
from . import codec
from .backends import Backend, MissingObject, ObjectExists, ReadOnly, open_backend
from .backends.appendonly import AppendOnlyBackend
from .codec import PLAIN, Codec, CodecError, SealingCodec, Verdict, key_check, seal, unseal
from .index import ChunkIndex, announce_change, encode_index, encode_mark
from .keys import Secret, make_slot, new_master, read_slots, unlock
from .manifest import (
    ENTRY_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    PAGE_ENTRIES,
    Manifest,
    block_size_allowed,
)
from .pack import ENTRY, ChunkRef, PackBuilder, pack_name, read_trailer

REPO_MAGIC = b"LVBREPO1"
FORMAT_VERSION = 1
ENCRYPTED_VERSION = 2     # older versions, which would write plaintext into it, refuse it
CIPHER = "aes-256-gcm"
# The secrets (passphrases, key files) to try on an encrypted repository, asked for only
# when the repository turns out to be encrypted.
Secrets = Callable[[], list[Secret]]
DEFAULT_BLOCK_SIZE = 128 * 1024
PACK_TARGET = 16 * 1024 * 1024
PACK_MAX_CHUNKS = 16384  # bounds a pack's trailer when blocks compress to almost nothing
PAGE_BYTES = PAGE_ENTRIES * ENTRY_SIZE   # a manifest page: a chunk too
INDEX_EVERY = 16  # packs per index file while a run is writing
# A repository id (a UUID): it names the index cache's file, so it must stay a plain name.
_REPO_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
_MAX_IOV = 512    # buffers per vectored read (the kernel takes up to 1024)


class ChunkError(CorruptionError):
    """A chunk that is missing, unreadable or fails its checksum (`damaged`: this copy of
    it is; otherwise the chunk is sound and the block's digest disagrees)."""

    def __init__(self, ref: ChunkRef, problem: str, damaged: bool = True):
        super().__init__(f"chunk {ref.chunk_id.hex()} in pack {ref.pack_id.hex()} {problem}")
        self.ref = ref
        self.damaged = damaged


def validate_block_size(block_size: int) -> int:
    if not block_size_allowed(block_size):
        raise UsageError(f"block size {block_size} must be a power of two from "
                         f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
    return block_size


class Repository:
    def __init__(self, storage: Backend, meta: dict, cache_dir: Path, codec: Codec = PLAIN):
        self.storage = storage
        self.meta = meta
        self.id: str = meta["id"]
        self.block_size: int = meta["block_size"]
        self.codec = codec
        # An encrypted repository's master key and the key slot that opened it.
        self.unlocked: tuple[bytes, str] | None = None
        self.index = ChunkIndex(Path(cache_dir) / f"index-{self.id}.sqlite")

    @property
    def encrypted(self) -> bool:
        return self.codec.encrypted

    # --- opening ------------------------------------------------------------------

    @classmethod
    def init(cls, location: str | Path, cache_dir: Path, block_size: int | None,
             secrets: Secrets | None = None, encrypt: bool = False,
             s3: S3Settings | None = None) -> tuple[Repository, bool]:
        """Create the repository if it does not exist; (repository, created). With
        `encrypt`, it is encrypted, its master key wrapped by the first of `secrets`."""
        storage = open_backend(location, create=True, s3=s3)
        if not storage.exists("config"):
            repo_id = str(uuid.uuid4())
            meta: dict = {"version": FORMAT_VERSION, "id": repo_id,
                          "block_size": validate_block_size(
                              DEFAULT_BLOCK_SIZE if block_size is None else block_size),
                          "created_at": now_iso()}
            chosen: Codec = PLAIN
            if encrypt:
                master = new_master()
                meta.update(version=ENCRYPTED_VERSION, encryption={
                    "cipher": CIPHER, "chunk_ids": "blake3-keyed", "key_check": key_check(master)})
                try:
                    # The slot first: a config is what makes a repository, and one must
                    # never exist that no key opens.
                    slot, data = make_slot(master, _all(secrets, location)[0], repo_id)
                    storage.put(slot, data)
                except BaseException:
                    storage.close()
                    raise
                crash_point("key-slot-stored")
                chosen = SealingCodec(master, repo_id)
            try:
                storage.put("config", seal(REPO_MAGIC, json.dumps(meta).encode()))
                repo = cls(storage, meta, cache_dir, chosen)
                if encrypt:
                    repo.unlocked = (master, slot)
                return repo, True
            except ObjectExists:
                pass  # a concurrent init won: its repository is the one
        storage.close()
        repo = cls.open(location, cache_dir, secrets, s3=s3)
        if block_size is not None and block_size != repo.block_size:
            repo.close()
            raise UsageError(f"repository {location} already exists with block size "
                             f"{repo.block_size}; a block size is chosen once, at init")
        if encrypt and not repo.encrypted:
            repo.close()
            raise UsageError(f"repository {location} already exists and is not encrypted; "
                             "encryption is chosen once, at init (copy the backups into a "
                             "new encrypted repository)")
        return repo, False

    @staticmethod
    def exists(location: str | Path, s3: S3Settings | None = None) -> bool:
        """Whether a repository (its config) exists at `location`."""
        try:
            storage = open_backend(location, s3=s3)
        except (UsageError, OSError):
            return False
        try:
            return storage.exists("config")
        finally:
            storage.close()

    @classmethod
    def open(cls, location: str | Path, cache_dir: Path, secrets: Secrets | None = None,
             slots: dict[str, bytes] | None = None, append_only: bool = False,
             s3: S3Settings | None = None) -> Repository:
        """The repository at `location`; an encrypted one unlocked with `secrets` through
        its key slots (or through `slots`, stored bytes by name: a key import's). With
        `append_only`, its storage refuses to delete or replace anything."""
        storage = open_backend(location, s3=s3)
        if append_only:
            storage = AppendOnlyBackend(storage)
        try:
            meta = _read_meta(storage, location)
            if meta["version"] == FORMAT_VERSION:
                return cls(storage, meta, cache_dir)
            master, slot = unlock(read_slots(storage) if slots is None else slots, meta["id"],
                                  meta["encryption"]["key_check"], _all(secrets, location),
                                  str(location))
        except BaseException:
            storage.close()
            raise
        repo = cls(storage, meta, cache_dir, SealingCodec(master, meta["id"]))
        repo.unlocked = (master, slot)
        return repo

    def close(self) -> None:
        self.index.close()
        self.storage.close()

    # --- index upkeep -------------------------------------------------------------

    def sync_index(self, lock_dir: Path, *, full: bool = False) -> list[str]:
        """Bring the cache up to date (with `full`, by listing the index whatever
        `index-changes` says) and index packs that dead runs left pending.

        Returns the problems found (ChunkIndex.sync), one line each.
        """
        bad = self.index.sync(self.storage, self.codec, full=full)
        for run in self.index.pending_runs():
            if not run_is_alive(lock_dir, run):
                # On failure (e.g. a full disk) the packs stay pending: a later run indexes them.
                with contextlib.suppress(OSError):
                    self._index_pending(run)
        return bad

    def _index_pending(self, run: str) -> None:
        groups = []
        for pack_id in self.index.pending_packs(run):
            try:
                refs = read_trailer(self.storage, pack_id, self.codec)
            except CorruptionError:  # missing or torn: the dead run never finished it
                self.index.forget_pack(pack_id)
                continue
            groups.append((pack_id, refs))
        if groups:
            self.write_index(groups)

    def write_index(self, groups: list[tuple[bytes, list[ChunkRef]]], *,
                    cached: bool = True) -> str:
        """Store an index file listing `groups` (and, if `cached`, record its entries in
        the cache); returns its name."""
        name, data = encode_index(groups, self.codec)
        self.storage.put_content_addressed(name, data)
        if cached:
            self.index.add_indexed(name, self.storage.token(name), groups)
        return name

    # --- chunks ---------------------------------------------------------------------

    def read_chunk(self, ref: ChunkRef) -> bytes:
        """The plaintext of a chunk, checked against its id."""
        self._check_lengths([ref])
        out = bytearray(ref.raw_length)
        self.read_chunks_into([(ref, memoryview(out), None)])
        return bytes(out)

    def _check_lengths(self, refs: list[ChunkRef]) -> None:
        """Refuse a length no chunk can have (from a forged or damaged index or trailer)
        before anything is allocated for it."""
        biggest = max(self.block_size, PAGE_BYTES)
        for r in refs:
            if r.raw_length > biggest:
                raise ChunkError(r, f"claims an implausible length {r.raw_length}")

    def read_chunks_into(self, wanted: list[tuple[ChunkRef, memoryview, bytes | None]]
                         ) -> None:
        """Write each chunk's plaintext into its buffer (of the plaintext's length), checked
        against the xxh3-128 digest given with it (a restore passes the block's digest from
        its manifest: an end-to-end check against the source as it was read, at xxh3's
        speed) or, given None, against the chunk's BLAKE3 id. Chunks stored back to back in
        a pack are read with one vectored read: those stored as their plaintext straight
        into their buffers, the others into a scratch buffer to decode from. Raises
        ChunkError naming the first bad chunk."""
        run: list[tuple[ChunkRef, memoryview, bytes | None]] = []
        for item in sorted(wanted, key=lambda w: (w[0].pack_id, w[0].offset)):
            ref, last = item[0], run[-1][0] if run else None
            if last and (len(run) == _MAX_IOV or ref.pack_id != last.pack_id
                         or ref.offset != last.offset + last.length):
                self._read_run(run)
                run = []
            run.append(item)
        if run:
            self._read_run(run)

    def _read_run(self, run: list[tuple[ChunkRef, memoryview, bytes | None]]) -> None:
        """Chunks that lie back to back in one pack."""
        plain = self.codec.stored_is_plain
        for ref, out, _ in run:
            if len(out) != ref.raw_length or (plain(ref.flags) and
                                              ref.length != ref.raw_length):
                raise ChunkError(ref, "fails its checksum")
            if ref.length > _stored_bound(ref.raw_length):
                raise ChunkError(ref, f"claims an implausible stored length {ref.length}")
        scratch = memoryview(bytearray(sum(r.length for r, _, _ in run
                                           if not plain(r.flags))))
        targets = []
        pos = 0
        for ref, out, _ in run:
            if plain(ref.flags):
                targets.append(out)
            else:
                targets.append(scratch[pos:pos + ref.length])
                pos += ref.length
        try:
            self.storage.get_range_into(pack_name(run[0][0].pack_id), run[0][0].offset, targets)
        except MissingObject as e:
            # The index named a pack that is gone: no backup reuses it, and the next sync
            # lets another copy of its chunks in, if an index file lists one.
            self.index.mark_lost(run[0][0].pack_id)
            raise ChunkError(run[0][0], str(e)) from None
        except CorruptionError as e:
            raise ChunkError(run[0][0], str(e)) from None
        for (ref, out, digest), blob in zip(run, targets, strict=True):
            if not plain(ref.flags):
                try:
                    self.codec.decode_into(ref.chunk_id, blob, ref.flags, out)
                except CodecError as e:
                    raise ChunkError(ref, str(e)) from None
            verdict = self.codec.check_block(out, ref.chunk_id, digest)
            if verdict is Verdict.DAMAGED:
                raise ChunkError(ref, "fails its checksum")
            if verdict is Verdict.DIGEST_MISMATCH:
                raise ChunkError(ref, "does not match the block's digest in the manifest",
                                 damaged=False)

    def quarantine(self, ref: ChunkRef) -> None:
        """Record that this copy of a chunk is damaged (a `damaged/` object), so that no
        new backup deduplicates against it: the next one to meet the data stores it again,
        and that copy then serves every backup that names the chunk. Best effort: a
        repository that cannot be written to (full, read-only) just keeps the damage."""
        self.index.mark_damaged(ref.chunk_id, ref.pack_id)
        try:
            self.storage.put(*encode_mark(ref.chunk_id, ref.pack_id, self.codec))
            announce_change(self.storage)
        except ObjectExists:
            pass  # found damaged before: the first mark stands
        except (OSError, ReadOnly):
            pass

    def pack_exists(self, pack_id: bytes) -> bool:
        """Whether a pack the index names exists. If not (its index file was put back
        after gc deleted it, or the pack was lost some other way), the index cache records
        it lost, so that no backup reuses a chunk from it."""
        name = pack_name(pack_id)
        if self.storage.exists(name):
            return True
        self.index.mark_lost(pack_id)
        if self.storage.exists(name):
            self.index.found_pack(pack_id)   # stored meanwhile by another run
        return False

    def packer(self, run_id: str) -> Packer:
        return Packer(self, run_id)

    # --- manifests ----------------------------------------------------------------------

    def manifest(self, backup_id: str) -> Manifest:
        """A backup's stored manifest (CorruptionError if missing or damaged, or of a
        block size other than the repository's, which every backup in it has)."""
        manifest = Manifest(self.storage, backup_id, self.codec, self.read_pages)
        if manifest.block_size != self.block_size:
            raise CorruptionError(f"{manifest.what} is corrupt (block size "
                                  f"{manifest.block_size}, the repository's is "
                                  f"{self.block_size})")
        return manifest

    def read_pages(self, ids: list[bytes]) -> dict[bytes, bytes]:
        """Chunks by id (a manifest's pages), found through the index, checked against
        their ids."""
        refs = self.index.lookup(ids)
        missing = [i for i in ids if i not in refs]
        if missing:
            raise CorruptionError(f"chunk {missing[0].hex()} is not in the repository index")
        return self.read_checked(list(refs.values()))

    def read_checked(self, refs: list[ChunkRef]) -> dict[bytes, bytes]:
        """The plaintexts of these chunks by id, checked against their ids; a damaged copy
        is quarantined (and ChunkError raised)."""
        self._check_lengths(refs)
        out = {r.chunk_id: (r, bytearray(r.raw_length)) for r in refs}
        try:
            self.read_chunks_into([(r, memoryview(b), None) for r, b in out.values()])
        except ChunkError as e:
            if e.damaged:
                self.quarantine(e.ref)
            raise
        return {i: bytes(b) for i, (_, b) in out.items()}


class Packer:
    """Collects a run's new chunks into packs, stores them, and indexes them.

    Order in the repository: a pack is stored (published whole), then recorded as pending
    in the cache, then listed in an index file every INDEX_EVERY packs and at commit().
    Packs are finished (hashed) and stored by writer threads, so that filling the next pack
    overlaps storing the last ones: one writer for a local directory, several for an object
    store (its Capabilities.concurrent_puts), where each put waits on the network. A fixed
    set of pack buffers (one more than the writers) takes turns, which bounds memory.
    """

    def __init__(self, repo: Repository, run_id: str):
        self.repo = repo
        self.run_id = run_id
        self.capacity = (PACK_TARGET + repo.block_size + PACK_MAX_CHUNKS * ENTRY.size
                         + 2 * ALIGN)  # the footer, and padding for O_DIRECT
        self.builder = PackBuilder(self.capacity, repo.codec.trailer_digest)
        self._writers_wanted = max(1, repo.storage.capabilities.concurrent_puts)
        self._buffers = 1
        self._free: queue.Queue[PackBuilder] = queue.Queue()   # stored, ready to refill
        self.unindexed: list[tuple[bytes, list[ChunkRef]]] = []
        # The one count of what a run adds to the repository: stored bytes, and the
        # plaintext they hold.
        self.stored_bytes = 0
        self.new_bytes = 0
        self.pack_ids: list[bytes] = []
        # Chunk ids this run stored that the index cache does not list yet. Replaced, never
        # changed in place, so that workers can read them without holding the lock.
        self._storing: frozenset[bytes] = frozenset()   # the packs being stored
        self._unindexed_ids: frozenset[bytes] = frozenset()   # stored, not in an index file
        # Whether each pack this run reuses a chunk from exists: asked once per pack and run.
        self._packs: dict[bytes, Future[bool]] = {}
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()   # one index file written at a time
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._writers: list[threading.Thread] = []

    def missing(self, ids: list[bytes]) -> set[bytes]:
        """Which of `ids` the repository does not have yet (counting this run's own chunks)."""
        with self._lock:
            storing, unindexed = self._storing, self._unindexed_ids
        candidates = [i for i in ids if i not in self.builder.ids and i not in storing
                      and i not in unindexed]
        if not candidates:
            return set()
        found = self.repo.index.lookup(candidates, undamaged=True)
        lost = self._lost_packs({r.pack_id for r in found.values()})
        return {i for i in candidates if i not in found or found[i].pack_id in lost}

    def _lost_packs(self, packs: set[bytes]) -> set[bytes]:
        """Which of these packs do not exist. Each is looked for once per run, by the
        first thread that meets it (a stat locally, a HEAD on object storage); the others
        wait for its answer."""
        with self._lock:
            mine: dict[bytes, Future[bool]] = {p: Future() for p in packs
                                               if p not in self._packs}
            self._packs.update(mine)
            answers = {p: self._packs[p] for p in packs}
        for pack_id, answer in mine.items():
            try:
                answer.set_result(self.repo.pack_exists(pack_id))
            except BaseException as e:
                for unanswered in mine.values():
                    if not unanswered.done():
                        unanswered.set_exception(e)
                raise
        return {p for p, answer in answers.items() if not answer.result()}

    def add(self, chunk_id: bytes, blob: codec.Buffer, raw_length: int, flags: int) -> None:
        """Store one chunk (the caller has checked, with missing(), that it is new)."""
        self.builder.add(chunk_id, blob, raw_length, flags)
        self.stored_bytes += len(blob)
        self.new_bytes += raw_length
        if len(self.builder) >= PACK_TARGET or len(self.builder.entries) >= PACK_MAX_CHUNKS:
            self._hand_off()

    def add_if_missing(self, chunk_id: bytes, plain: bytes, level: int) -> None:
        """Store `plain` under `chunk_id` unless the repository has it already."""
        if self.missing([chunk_id]):
            blob, flags = self.repo.codec.encode(chunk_id, plain, level)
            self.add(chunk_id, blob, len(plain), flags)

    def flush(self) -> None:
        """Store the current pack now (it is recorded as pending, not yet indexed)."""
        self._hand_off()
        self._wait()

    def _hand_off(self) -> None:
        """Give the current pack to the writers, and take a free buffer to fill next
        (waiting for a writer to finish one when every buffer is in use)."""
        if not self.builder.entries:
            return
        if self._error is not None:
            raise self._error
        full = self.builder
        with self._lock:
            self._storing = self._storing | full.ids
        if len(self._writers) < self._writers_wanted:
            writer = threading.Thread(target=self._write_packs, name="lvbackup-packer",
                                      daemon=True)
            writer.start()
            self._writers.append(writer)
        self._queue.put(full)
        if self._buffers <= self._writers_wanted:
            self._buffers += 1
            self.builder = PackBuilder(self.capacity, self.repo.codec.trailer_digest)
        else:
            self.builder = self._free.get()
        if self._error is not None:
            raise self._error

    def _write_packs(self) -> None:
        while True:
            full = self._queue.get()
            try:
                if full is None:
                    return
                if self._error is None:
                    self._store(full)
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                self._error = e
            finally:
                if full is not None:
                    with self._lock:
                        self._storing = self._storing - full.ids
                    full.reset()
                    self._free.put(full)
                self._queue.task_done()

    def _store(self, full: PackBuilder) -> None:
        pack_id, data, refs = full.finish()
        # A slice of the page-aligned pack buffer: the local backend writes it with O_DIRECT.
        self.repo.storage.put_content_addressed(pack_name(pack_id), full.view[:len(data)])
        crash_point("pack-stored")
        stored: Future[bool] = Future()
        stored.set_result(True)
        with self._lock:   # it may be a pack found missing earlier in this run, stored again
            self._packs[pack_id] = stored
        self.repo.index.add_pending(pack_id, self.run_id)
        crash_point("pack-pending")
        with self._lock:
            self.unindexed.append((pack_id, refs))
            self.pack_ids.append(pack_id)
            self._unindexed_ids = self._unindexed_ids | full.ids
            due = len(self.unindexed) >= INDEX_EVERY
        if due:
            self._write_index()

    def _wait(self) -> None:
        """Until the writers are idle; re-raise what one failed with."""
        if self._writers:
            self._queue.join()
        if self._error is not None:
            raise self._error

    def _write_index(self) -> None:
        with self._index_lock:
            with self._lock:
                groups, self.unindexed = self.unindexed, []
                listed = frozenset(i for _, refs in groups for i in (r.chunk_id for r in refs))
            if not groups:
                return
            try:
                self.repo.write_index(groups)
            except BaseException:
                with self._lock:   # still unindexed: commit() tries again, or a later run
                    self.unindexed[:0] = groups
                raise
            with self._lock:
                self._unindexed_ids = self._unindexed_ids - listed
            crash_point("index-written")

    def commit(self) -> None:
        """Store the last pack and index everything this run wrote."""
        try:
            self.flush()
        finally:
            for _ in self._writers:
                self._queue.put(None)
            for writer in self._writers:
                writer.join()
            self._writers = []
        self._write_index()


def _stored_bound(raw_length: int) -> int:
    """The most bytes a chunk of `raw_length` bytes can take stored: zstd's worst case
    (its compressBound), plus a sealed blob's nonce and tag."""
    return raw_length + (raw_length >> 7) + 1024


def _read_meta(storage: Backend, location: str | Path) -> dict:
    """The repository's config, checked: its version known, its fields of the right types."""
    try:
        raw = storage.get("config")
    except MissingObject:
        raise UsageError(f"no repository at {location}; "
                         "create it with 'lvbackup init'") from None
    except OSError as e:
        raise UsageError(f"cannot read repository {location}: {e.strerror}") from None
    what = f"repository config {location}/config"
    try:
        meta = json.loads(unseal(REPO_MAGIC, raw, what))
        version = meta.get("version")
        ok = isinstance(meta["id"], str) and type(meta["block_size"]) is int
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        raise CorruptionError(f"{what} is corrupt (bad JSON)") from None
    if version not in (FORMAT_VERSION, ENCRYPTED_VERSION):
        raise UsageError(f"repository {location} has format version {version}; "
                         f"this lvbackup reads versions {FORMAT_VERSION} and "
                         f"{ENCRYPTED_VERSION}")
    if version == ENCRYPTED_VERSION:
        enc = meta.get("encryption")
        if not isinstance(enc, dict) or enc.get("cipher") != CIPHER:
            raise UsageError(f"repository {location} is encrypted with {enc!r}, which this "
                             "lvbackup does not know")
        ok = ok and isinstance(enc.get("key_check"), str)
    if not ok or not _REPO_ID.fullmatch(meta["id"]):
        raise CorruptionError(f"{what} is corrupt (bad fields)")
    if not block_size_allowed(meta["block_size"]):
        raise CorruptionError(f"{what} is corrupt (block size {meta['block_size']} is not a "
                              f"power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE})")
    return meta


def _all(secrets: Secrets | None, location: str | Path) -> list[Secret]:
    got = secrets() if secrets is not None else []
    if not got:
        raise UsageError(f"repository {location} is encrypted: give its passphrase "
                         "($LVBACKUP_PASSPHRASE, or passphrase_file: or passphrase_command: in "
                         "the configuration) or its key_file:")
    return got
