"""PROVISIONAL (replaced by the codec branch at merge)."""
from __future__ import annotations
import threading
import blake3
import zstandard
FLAG_RAW = 0
FLAG_ZSTD = 1
_tls = threading.local()
def chunk_id(block) -> bytes:
    return blake3.blake3(block).digest()
def encode(block, level: int):
    c = getattr(_tls, "cctx", None)
    if c is None or _tls.level != level:
        c = _tls.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _tls.level = level
    blob = c.compress(block)
    if len(blob) < len(block):
        return blob, FLAG_ZSTD
    return block, FLAG_RAW
