"""An HTTP proxy in front of the test S3 server that cuts responses off: the headers and
part of the body of a GET, then the connection closes, as a dropped connection or a proxy's
timeout does mid-transfer. `cut` says how many of the next GET bodies it cuts."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class TruncatingProxy:
    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.cut = 0        # GET bodies still to cut off
        self.cut_paths: list[str] = []   # what was cut off so far
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status, reply.reason)
                for name, value in reply.getheaders():
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                # A HEAD's length is the object's, not that of the (empty) body.
                self.send_header("Content-Length", reply.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command == "GET" and len(data) > 1 and proxy._take_cut(self.path):
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _take_cut(self, path: str) -> bool:
        with self.lock:
            if self.cut <= 0:
                return False
            self.cut -= 1
            self.cut_paths.append(path)
            return True

    @property
    def cuts(self) -> int:
        return len(self.cut_paths)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
