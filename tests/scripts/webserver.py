"""A plain web server on 127.0.0.1 (the standard library's ``http.server``) publishing a local directory,
as a user publishes checkpoints: files only, by name. It gives no directory listing (nginx and S3 static
hosting give none either), ignores ``Range`` (as ``SimpleHTTPRequestHandler`` does), and can be told to
send a file's body longer than the file, to check what a client accepts."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: WebServer

    def list_directory(self, path):  # noqa: ANN001 - the standard library's signature
        self.send_error(404, "no listing")  # a plain server publishes files, not pages of links
        return None

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed:
            self.server.requests.append(f"{self.command} {self.path}")
        return parsed

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        extra = self.server.longer.get(self.path.lstrip("/"))
        if extra is None:
            super().do_GET()
            return
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        try:
            self.wfile.write(body)
            zeros = bytes(2**20)
            for at in range(0, extra, len(zeros)):  # as much as the client takes; it should stop early
                self.wfile.write(zeros[:min(len(zeros), extra - at)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: what the test wants

    def log_message(self, format, *args) -> None:  # noqa: A002, ANN001 - quiet: one line per request otherwise
        pass


class WebServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` at :attr:`url` until :meth:`stop`.

    Attributes:
        requests: every request's method and path (``"GET /run/step=4/manifest.json"``), in order.
        longer: a served file's path (relative to ``root``) -> how many bytes to send after its end.
    """

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.root = root
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[str] = []
        self.longer: dict[str, int] = {}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()
