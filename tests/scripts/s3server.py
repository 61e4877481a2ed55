"""A real S3 server on 127.0.0.1 (moto's server mode) for the remote-storage tests, reached through s3fs."""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any

import fsspec
from moto.server import ThreadedMotoServer

# Credentials moto accepts; the fixture also sets them as AWS_* variables so nothing reads ~/.aws.
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    """A moto S3 server on a fixed free port of 127.0.0.1, so it can be stopped and started again."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"b-{uuid.uuid4().hex[:12]}"
        self._server: ThreadedMotoServer | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The ``storage_options`` that reach this server."""
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": "testing", "secret": "testing"}

    def url(self, prefix: str = "run") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def fs(self) -> fsspec.AbstractFileSystem:
        """A fresh s3fs instance (no shared caches) to look at or tamper with what the server holds."""
        return fsspec.filesystem("s3", skip_instance_cache=True, **self.options)

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


class S3Process(S3Server):
    """The same server in a process of its own: what this process allocates is then the client's alone
    (for memory measurements), and the server takes a core of its own as a remote one would."""

    _CODE = ("import logging, sys\n"
             "from moto.server import ThreadedMotoServer\n"
             "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
             "server = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\n"
             "server.start()\n"
             "print('ready', flush=True)\n"
             "sys.stdin.read()\n"
             "server.stop()\n")

    def start(self) -> None:
        import os
        import subprocess
        import sys

        self._process = subprocess.Popen([sys.executable, "-c", self._CODE, str(self.port)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
        if self._process.stdout is None or self._process.stdout.readline().strip() != "ready":
            raise RuntimeError("the moto server did not start")

    def stop(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None:
            process.stdin.close()
            process.stdout.close()
            process.wait(timeout=30)
            self._process = None
