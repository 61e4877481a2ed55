"""A moto S3 server on 127.0.0.1 in a process of its own, for the benchmarks that measure object storage: what this
process allocates and does is then the client's alone, and the server takes a core of its own as a remote one would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

# Credentials moto accepts (as tests/scripts/s3server.py sets them), so that nothing reads ~/.aws.
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}
_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


class MotoServer:
    """Started at once; :attr:`options` are the ``storage_options`` that reach it; :meth:`stop` ends it.

    Raises:
        RuntimeError: it did not start (moto missing).
    """

    def __init__(self) -> None:
        os.environ.update(ENV)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self._process: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.options: dict[str, Any] = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                                        "key": "testing", "secret": "testing"}
        if self._process.stdout is None or self._process.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("the moto S3 server did not start (is moto installed? it is in the dev extra)")

    def stop(self) -> None:
        """End the server (its stdin closed: it stops itself; killed if it has not within 30 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
