"""Starting real server processes for the tests (test_serve.py, test_serve_openai.py): a free port, a process whose
output goes to a file, and `medsynapse serve` started and waited for until its /health answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())"]


def spawn(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start a server whose output goes to a file: a pipe nobody reads fills (64 KB) and blocks the server."""
    return subprocess.Popen(command, env={**os.environ, "TQDM_DISABLE": "1", **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(model: Path, log: Path, *flags: str) -> Iterator[str]:
    """`medsynapse serve --model MODEL FLAGS...` on a free port, its base URL (http://127.0.0.1:PORT) once /health
    answers 200; stopped on leaving."""
    port = free_port()
    server = spawn([*CLI, "serve", "--model", str(model), "--port", str(port), *flags], log)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                pytest.fail(f"the server exited with {server.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start:\n{tail(log)}")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
