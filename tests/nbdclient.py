"""A minimal NBD client (fixed newstyle handshake, NBD_OPT_EXPORT_NAME, simple replies) for
the tests that talk to lvbackup's nbdkit server without the kernel's client."""

from __future__ import annotations

import socket
import struct

_REQUEST, _REPLY = 0x25609513, 0x67446698
_READ, _WRITE, _DISCONNECT = 0, 1, 2
_NO_ZEROES = 2


class NbdClient:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        magic, opt, flags = struct.unpack(">8s8sH", self._recv(18))
        assert (magic, opt) == (b"NBDMAGIC", b"IHAVEOPT"), (magic, opt)
        self.sock.sendall(struct.pack(">I", flags & (1 | _NO_ZEROES)))
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))   # NBD_OPT_EXPORT_NAME ""
        self.size, self.flags = struct.unpack(">QH", self._recv(10))
        if not flags & _NO_ZEROES:
            self._recv(124)
        self._handle = 0

    @property
    def read_only(self) -> bool:
        return bool(self.flags & 2)

    def _recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise ConnectionError("the server closed the connection")
            out += got
        return bytes(out)

    def _request(self, kind: int, offset: int, length: int, payload: bytes = b"") -> int:
        """Send one request; its error number (0: success)."""
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", _REQUEST, 0, kind, self._handle, offset,
                                      length) + payload)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        assert (magic, handle) == (_REPLY, self._handle)
        return error

    def pread(self, offset: int, length: int) -> tuple[int, bytes]:
        """(errno, data): the data only when errno is 0."""
        error = self._request(_READ, offset, length)
        return error, (b"" if error else self._recv(length))

    def pwrite(self, offset: int, data: bytes) -> int:
        return self._request(_WRITE, offset, len(data), data)

    def close(self) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", _REQUEST, 0, _DISCONNECT, 0, 0, 0))
        self.sock.close()
