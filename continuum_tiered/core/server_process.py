"""Start and stop a vLLM OpenAI server as a child process (demo, tests, experiments)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from continuum_tiered.core.net import free_port


class StartStop:
    """``with part:`` starts it (``start()`` returns the part) and stops it on the way out."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerError(RuntimeError):
    pass


BLOCK_SIZE = 32
MIN_KV_BLOCKS = 2  # vLLM's null block and one to hold a request


def model_positions(model_dir: Path) -> int | None:
    """The positions of the model in ``model_dir`` (``max_position_embeddings`` of its
    ``config.json``); None when it does not say."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    positions = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        return positions
    return None


def tiny_max_model_len(model_dir: Path, num_blocks: int) -> int:
    """The longest request on a pool of ``num_blocks``: all of it (block 0 is vLLM's null
    block), but no longer than the model has positions (vLLM refuses to start otherwise)."""
    if num_blocks < MIN_KV_BLOCKS:
        raise ValueError(
            f"a KV pool of {num_blocks} blocks holds no request; it needs at least "
            f"{MIN_KV_BLOCKS} blocks (vLLM keeps block 0 as its null block)"
        )
    pool_tokens = (num_blocks - 1) * BLOCK_SIZE
    positions = model_positions(model_dir)
    return pool_tokens if positions is None else min(pool_tokens, positions)


def tiny_engine_flags(model_dir: Path, num_blocks: int) -> list[str]:
    """vLLM flags for a random-weight model on the CPU build
    (docs/architecture.md, 'vLLM CPU build').

    The KV pool is ``num_blocks`` blocks; one request may fill all of it (vLLM refuses to
    start when the longest request could not fit), or as much as the model has positions
    for (:func:`tiny_max_model_len`).
    """
    return [
        "--load-format",
        "dummy",
        "--enforce-eager",
        "--block-size",
        str(BLOCK_SIZE),
        "--num-gpu-blocks-override",
        str(num_blocks),
        "--max-model-len",
        str(tiny_max_model_len(model_dir, num_blocks)),
        # On the CPU build this is the share of the NUMA node's memory vLLM reserves.
        "--gpu-memory-utilization",
        "0.15",
        "--served-model-name",
        "tiny",
        "--tokenizer",
        str(model_dir),
    ]


class ServerProcess(StartStop):
    """A server command run until ``/health`` answers; its output goes to ``log_path``.

    ``command`` gets ``--host 127.0.0.1 --port PORT`` appended (``port``: a free one unless
    given). Used as a context manager it always stops the process group, so no engine
    process outlives a test. ``launch`` and ``wait_ready`` apart start several servers at once.
    """

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> ServerProcess:
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the process (in a session of its own) without waiting for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 300.0) -> ServerProcess:
        """Wait until ``/health`` answers; stop the server and raise ServerError if it exits
        or does not answer in ``timeout_s``."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"server exited with code {self.process.returncode} before it was ready; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"server not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def python_module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def vllm_command(model: str | Path, *vllm_flags: str) -> list[str]:
    """Plain vLLM's OpenAI server (the CPU build has no working ``vllm`` CLI, see
    ``continuum_tiered.vllm.serve.vllm_server_command``; the module takes the same flags)."""
    return python_module_command(
        "vllm.entrypoints.openai.api_server", "--model", str(model), *vllm_flags
    )


def continuum_serve_command(model: str | Path, *serve_args: str) -> list[str]:
    """``continuum-tiered serve``: its own options (``--policy``, ``--profile``, ...) and
    vLLM flags, in any order."""
    return python_module_command("continuum_tiered.cli", "serve", str(model), *serve_args)


def vanilla_server_command(model_dir: Path, num_blocks: int, *vllm_flags: str) -> list[str]:
    """Plain vLLM on a random-weight model."""
    return vllm_command(model_dir, *tiny_engine_flags(model_dir, num_blocks), *vllm_flags)


def plugin_server_command(model_dir: Path, num_blocks: int, *serve_options: str) -> list[str]:
    """``continuum-tiered serve`` on a random-weight model."""
    return continuum_serve_command(
        model_dir, *serve_options, *tiny_engine_flags(model_dir, num_blocks)
    )


def prometheus_samples(url: str, prefix: str = "") -> dict[str, float]:
    """Each metric of ``/metrics`` whose name starts with ``prefix``, summed over labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#") and " " in line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            samples[name] = samples.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return samples
