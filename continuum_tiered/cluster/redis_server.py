"""A Redis server as a child process: the shared KV tier of a cluster, for tests and
``continuum-tiered cluster``.

The binary is the OS's ``redis-server`` or, where the OS has none, the one
``scripts/bootstrap.sh`` unpacks into the virtual environment (``.venv/bin/redis-server``).
The server keeps nothing on disk (no RDB snapshot, no AOF): the shared tier is a cache, and
a restart that starts empty is what LMCache expects of it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from continuum_tiered.core.net import free_port
from continuum_tiered.core.server_process import StartStop


class RedisServerError(RuntimeError):
    pass


def redis_server_binary() -> str:
    """The ``redis-server`` to run: the virtual environment's first, then the OS's."""
    beside_python = Path(sys.executable).with_name("redis-server")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(
            "no redis-server: install the OS package (Debian: apt-get install redis-server) "
            "or run scripts/bootstrap.sh, which unpacks one into .venv/bin"
        )
    return found


class RedisServer(StartStop):
    """``with RedisServer(maxmemory="1gb") as r: r.url`` -> ``redis://127.0.0.1:PORT``.

    ``maxmemory`` bounds the shared tier; past it Redis evicts least recently used keys
    (``allkeys-lru``), as a cache should, instead of refusing writes.
    """

    def __init__(self, port: int | None = None, maxmemory: str = "1gb", log: Path | None = None):
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "allkeys-lru",
        ]  # fmt: skip
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.is_up():
            if self._process.poll() is not None:
                raise RedisServerError(
                    f"redis-server on port {self.port} exited with {self._process.returncode}"
                    + (f"; see {self.log}" if self.log else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server on port {self.port} not up in {timeout_s}s")
            time.sleep(0.05)
        return self

    def is_up(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def keys(self) -> int:
        """How many keys the server holds (LMCache stores a chunk's KV and metadata)."""
        return int(redis.Redis(port=self.port, socket_timeout=2).dbsize())

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as on a
        hung or partitioned host."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def stop(self) -> None:
        if self._process is None:
            return
        self.resume()  # a frozen server would not act on SIGTERM
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
