"""A run killed with SIGKILL and resumed logs exactly the losses of an uninterrupted run;
SIGTERM saves a checkpoint and exits cleanly (preemption)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 24

SCRIPT = """
import sys, time
import numpy as np
from pathlib import Path
from llmjax.config import TrainConfig, get_config
from llmjax.data.loader import ArrayTokens
from llmjax.train.loop import RunConfig, train

class SlowTokens(ArrayTokens):
    '''Reads wait, so that the test can stop the run in the middle.'''
    def tokens(self, start, stop):
        time.sleep(float(sys.argv[2]))
        return super().tokens(start, stop)

ids = np.random.default_rng(0).integers(0, 301, 20000).astype(np.uint16)
run = RunConfig(Path(sys.argv[1]), batch_size=4, seq_len=16, log_every=1, eval_every=1000, save_every=5,
                progress=False)
train(get_config("gpt2-tiny"), TrainConfig(lr=1e-3, warmup_steps=2, total_steps=%d), run, SlowTokens(ids))
""" % TOTAL_STEPS


def start(run_dir: Path, read_delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, like an ordinary run
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir), str(read_delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_losses(run_dir: Path) -> dict[int, list[float]]:
    """{step: [loss each time it was logged]} (a resumed run logs some steps again)."""
    losses: dict[int, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if record["kind"] == "train":
            losses.setdefault(record["step"], []).append(record["loss"])
    return losses


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_losses(run_dir), default=0) < step:
        assert process.poll() is None, f"run ended early:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "run did not reach the step in time"
        time.sleep(0.02)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, list[float]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(start(run_dir, 0.0))
    losses = logged_losses(run_dir)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    return losses


def test_sigkill_then_resume_gives_the_same_losses(uninterrupted, tmp_path):
    process = start(tmp_path, 0.01)
    wait_for_step(process, tmp_path, 12)  # checkpoints at 5 and 10 exist; 11.. are lost with the kill
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(logged_losses(tmp_path))
    assert killed_at < TOTAL_STEPS
    finish(start(tmp_path, 0.0))
    resumed = logged_losses(tmp_path)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step, losses in resumed.items():
        assert all(loss == uninterrupted[step][0] for loss in losses), (step, losses, uninterrupted[step])
    assert any(len(losses) > 1 for losses in resumed.values())  # some steps really were run twice


def test_sigterm_saves_and_exits_then_resumes(uninterrupted, tmp_path):
    """SIGTERM loses no work: the run saves where it stands, and the resumed run starts right there."""
    process = start(tmp_path, 0.01)
    wait_for_step(process, tmp_path, 7)
    process.send_signal(signal.SIGTERM)
    finish(process)  # exits 0 after saving
    stopped_at = max(logged_losses(tmp_path))
    assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
    finish(start(tmp_path, 0.0))
    resumed = logged_losses(tmp_path)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step, losses in resumed.items():
        assert losses == uninterrupted[step], step  # each step logged once, with the same loss
