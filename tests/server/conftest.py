"""A real `fast-xlstm serve` process on CPU for the server tests, and offline references.

One server runs for the whole package (starting one costs seconds), with small limits so every
limit is cheap to hit: 8 state slots and a 64-token step budget (queueing and chunked prefill under
concurrency), a 4,096-token max model length and a 64 KiB body limit. It requires an API key.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from fast_xlstm import LLM, SamplingParams

API_KEY = "test-key"
MODEL = "xlstm-tiny"
SLOTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m fast_xlstm serve ...` in a subprocess, its output in a log file."""

    def __init__(self, log: Path, *args: str, api_key: str | None = None, slots: int = 256,
                 env: dict[str, str] | None = None):
        self.api_key, self.slots = api_key, slots
        if api_key is not None:
            args = (*args, "--api-key", api_key)
        args = (*args, "--max-num-seqs", str(slots))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "fast_xlstm", "serve", "--model", MODEL, "--device", "cpu",
               "--port", str(self.port), "--log-level", "warning", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends `sig` and waits; returns the exit code (kills it, and fails, if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {sample name with labels: value} (comments skipped)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="package")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(log, "--max-num-batched-tokens", "64", "--max-model-len", "4096",
                        "--max-request-bytes", str(64 * 1024), api_key=API_KEY, slots=SLOTS)
    srv.wait_ready()
    yield srv
    code = srv.stop()
    # Uvicorn shuts down gracefully, then re-raises the signal so the parent sees it.
    assert code in (0, -signal.SIGTERM), f"server exited with {code} on SIGTERM:\n{log.read_text()}"


@pytest.fixture(scope="package")
def offline() -> LLM:
    """The same model as the server's, for reference outputs (the preset's random init is seeded)."""
    return LLM(MODEL, device="cpu")


@pytest.fixture(scope="package")
def ref(offline: LLM):
    """`ref(prompts, **params)`: offline outputs of `prompts` (text or ids) with SamplingParams(**params)."""
    return lambda prompts, **params: offline.generate(prompts, SamplingParams(**params), use_tqdm=False)


@pytest.fixture
def client(server: ServerProcess):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def async_client_factory(server: ServerProcess):
    """A function making an async client (make it inside the running event loop)."""
    import openai

    return lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """`start_server(*args, **kw)`: another server process (killed at teardown if still running)."""
    started: list[ServerProcess] = []

    def start(*args: str, **kw) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"server{len(started)}.log", *args, **kw)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
