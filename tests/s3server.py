"""A real S3-compatible server for the object-storage tests: versitygw (Apache-2.0) over a POSIX folder.

``tests/s3/build.sh`` builds it from its Go module once per machine (cached by version); ``S3Server`` runs it on
127.0.0.1 at a free port with its data in a folder of the caller's, one root key pair, and stops it by the pid it
recorded. Tests reach it the way jobs and pods reach object storage: through the standard ``AWS_*`` variables
(``S3Server.env``), which s3fs/botocore read (docs/install.md, "Object storage").
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# Not from tests.conftest: the benchmarks start this server too, without pytest's settings.
BUILD = Path(__file__).resolve().parent / "s3" / "build.sh"


class GoMissing(RuntimeError):
    """No Go toolchain: the server cannot be built here."""


def build() -> Path:
    """The server binary, built (or taken from the per-machine cache) by tests/s3/build.sh."""
    if shutil.which("go") is None:
        raise GoMissing("Go is not installed: tests/s3/build.sh builds the S3 server (versitygw) from its Go module")
    done = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"tests/s3/build.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The variables a process needs to use this store through s3fs (the same a job's pod gets)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.url, "AWS_DEFAULT_REGION": self.region}


class S3Server:
    """versitygw on ``host`` (127.0.0.1; the real-node test binds the node's bridge address, where pods reach
    it), its buckets under ``root``; ``start()`` returns once it answers requests."""

    def __init__(self, root: Path, binary: Path | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.root = Path(root)
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.endpoint: S3Endpoint | None = None

    def start(self, bucket: str = "llm2llm-test", timeout_s: float = 60) -> S3Endpoint:
        binary = self.binary or build()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        access, secret = f"test{secrets.token_hex(4)}", secrets.token_hex(16)
        port = _free_port(self.host)
        url = f"http://{self.host}:{port}"
        log_path = self.root / "server.log"
        # The key pair through the environment, not argv: nothing secret in the process list.
        env = {**os.environ, "ROOT_ACCESS_KEY_ID": access, "ROOT_SECRET_ACCESS_KEY": secret}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([str(binary), "--port", f"{self.host}:{port}", "--quiet", "posix", str(data)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:  # a server that does not come up or take its bucket is stopped here: no caller holds it yet
            self._wait_up(url, log_path, timeout_s)
            self.endpoint = S3Endpoint(url, access, secret, bucket)
            self._make_bucket(self.endpoint)
        except BaseException:
            self.stop()
            raise
        return self.endpoint

    def _wait_up(self, url: str, log_path: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"S3 server exited with {self.proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return
            except urllib.error.HTTPError:  # 403 to an anonymous request: it is up
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3 server not up in {timeout_s}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)

    @staticmethod
    def _make_bucket(ep: S3Endpoint) -> None:
        import s3fs

        # No region: s3fs would send it as a LocationConstraint, which us-east-1 must not have.
        fs = s3fs.S3FileSystem(key=ep.access_key, secret=ep.secret_key, endpoint_url=ep.url, skip_instance_cache=True)
        fs.mkdir(ep.bucket)

    def stop(self) -> None:
        """Stop the server by its recorded pid (SIGTERM, then SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
