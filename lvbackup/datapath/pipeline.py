"""An ordered, bounded, parallel map: the shape of every data path (docs/architecture.md).

A feeder thread pulls items (typically: reads a segment into a reused buffer) and submits
`fn(item)` to a small thread pool; results come back in input order. At most `depth` items
are in flight, so memory is bounded by the segment size and the depth, never by the volume.
"""

from __future__ import annotations

import ctypes
import mmap
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..base.diskio import aligned_buffer

# A data path's unit of work (a backup's and a restore's segments), and how many are in
# flight at once: the memory a run takes is about (DEPTH + workers + 2) segments.
SEGMENT = 4 * 1024 * 1024
DEPTH = 4

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Stopped(Exception):
    """The consumer went away; the feeder should stop producing."""


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int,
                stop: threading.Event | None = None) -> Iterator[R]:
    """Yield fn(item) for each item, in order. `stop` is set when the consumer finishes,
    so that a BufferPool sharing it releases a feeder waiting for a buffer."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lvbackup-worker")
    pending: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = stop or threading.Event()

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                pending.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(pool.submit(fn, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failed(e))
            return
        put(_DONE)

    feeder = threading.Thread(target=feed, name="lvbackup-reader", daemon=True)
    feeder.start()
    try:
        while True:
            got = pending.get()
            if got is _DONE:
                return
            if isinstance(got, _Failed):
                raise got.exc
            assert isinstance(got, Future)
            yield got.result()
    finally:
        stop.set()
        while feeder.is_alive():
            try:
                got = pending.get(timeout=0.1)
                if isinstance(got, Future):
                    got.cancel()
            except queue.Empty:
                pass
        feeder.join()
        pool.shutdown(wait=True, cancel_futures=True)


def tune_malloc() -> None:
    """Keep glibc from mapping and unmapping every block-sized object.

    Compressed blocks and raw copies are ~128 KiB Python objects, right at glibc's default
    mmap threshold: each would be a fresh mmap, page faults, and a munmap. A fixed 16 MiB
    threshold serves them from the heap, which a high trim threshold keeps; two arenas
    (the main one and one for all worker threads) keep what the heap holds bounded.
    Call once, early, before the data path starts its threads; elsewhere than glibc it
    does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    for param, value in ((-3, 16 << 20),    # M_MMAP_THRESHOLD
                         (-1, 64 << 20),    # M_TRIM_THRESHOLD
                         (-8, 2)):          # M_ARENA_MAX
        mallopt(param, value)


class BufferPool:
    """Reusable page-aligned buffers (for O_DIRECT), so reading or restoring a volume
    allocates a fixed amount of memory."""

    def __init__(self, count: int, size: int, stop: threading.Event):
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        self._stop = stop
        for _ in range(count):
            self._free.put(aligned_buffer(size))

    def get(self) -> mmap.mmap:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise Stopped() from None

    def put(self, buf: mmap.mmap) -> None:
        self._free.put(buf)
