"""`python -m experiments serve --workers N`: N processes on one port, each with its own model, answer alike."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from llmjax.embed import embed_texts
from llmjax.io.models import load_model

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_pids(url: str, want: int, timeout: float = 240) -> set[int]:
    """The pids that answer /health on fresh connections, until `want` of them have (each worker compiles first)."""
    pids, deadline = set(), time.monotonic() + timeout
    while len(pids) < want and time.monotonic() < deadline:
        try:
            pids.add(httpx.get(url + "/health", timeout=5).json()["pid"])
        except httpx.TransportError:
            time.sleep(0.2)
    return pids


def start_server(workers: int = 2) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "experiments", "serve", "--model", "bert-tiny", "--workers",
                               str(workers), "--port", str(port), "--no-warmup", "--log-level", "warning"], cwd=ROOT,
                              env=env)
    return server, f"http://127.0.0.1:{port}"


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def two_workers():
    server, url = start_server()
    try:
        yield server, url
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(30)


def test_two_workers_answer_alike_and_stop_on_sigterm(two_workers):
    server, url = two_workers
    pids = worker_pids(url, 2)
    assert len(pids) == 2 and server.pid not in pids, f"workers seen: {pids}"
    texts = ["def add(a, b): return a + b", "import os", "a longer line of plain English words"]
    got = []
    for _ in range(6):  # a new connection each time: the kernel spreads them over both workers
        with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
            got.append(np.array([item.embedding for item in client.embeddings.create(model="bert-tiny",
                                                                                     input=texts).data]))
    model = load_model(preset="bert-tiny", seed=0)
    expected = embed_texts(model.params, model.cfg, model.tokenizer, texts, batch_size=8,
                           max_len=model.cfg.max_seq_len)
    for answer in got:
        np.testing.assert_allclose(answer, expected, atol=1e-5)
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert all(gone(pid) for pid in pids)  # every worker stopped with its parent


def test_workers_exit_when_their_parent_is_killed(two_workers):
    server, url = two_workers
    pids = worker_pids(url, 2)
    assert len(pids) == 2
    server.kill()  # SIGKILL: the parent cannot stop them itself
    deadline = time.monotonic() + 30
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(pid) for pid in pids), "orphaned workers kept serving"


def test_workers_must_be_positive(capsys):
    from llmjax.experiments import serve

    with pytest.raises(SystemExit) as caught:
        serve.main(["--model", "bert-tiny", "--workers", "0"])
    assert caught.value.code == 2 and "--workers=0: must be >= 1" in capsys.readouterr().err
