"""Training on meshes: --mesh / --sharding in the loop, resuming onto another mesh, and two
processes joined through jax.distributed (localhost, CPU) agreeing with one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.data.loader import ArrayTokens
from llmjax.train.loop import RunConfig, TrainingError, read_metrics, train

ROOT = Path(__file__).resolve().parents[2]
MODEL = get_config("llama-tiny")
TOKENS = ArrayTokens(np.random.default_rng(0).integers(0, 301, 30000).astype(np.uint16))


def train_losses(run_dir: Path, steps: int, mesh: str, sharding: str) -> dict[int, float]:
    run = RunConfig(run_dir, batch_size=8, seq_len=32, log_every=1, eval_every=1000, save_every=3, sample_tokens=0,
                    progress=False, async_checkpoints=False, mesh=mesh, sharding=sharding)
    train(MODEL, TrainConfig(lr=3e-3, warmup_steps=0, total_steps=steps, schedule="constant"), run, TOKENS)
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_checkpoint_written_on_one_mesh_resumes_on_another(tmp_path):
    uninterrupted = train_losses(tmp_path / "whole", 6, "fsdp=8", "fsdp")  # saves at steps 3 and 6, FSDP-sharded
    # The run folder a 3-step run on fsdp=8 leaves (the same state, data position and metrics as the whole run's
    # first 3 steps), taken from the whole run rather than trained and compiled again.
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    shutil.copytree(whole / "checkpoints" / "3", moved / "checkpoints" / "3")
    shutil.copy(whole / "config.json", moved / "config.json")
    lines = (whole / "metrics.jsonl").read_text().splitlines(keepends=True)
    (moved / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= 3))
    resumed = train_losses(tmp_path / "moved", 6, "data=4,tensor=2", "tp")  # restored into Megatron shards
    assert sorted(resumed) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(4, 7)], [uninterrupted[s] for s in range(4, 7)], rtol=1e-4)


@pytest.mark.parametrize("mesh,sharding,seq,message", [
    ("data=3", "auto", 32, "mesh data=3 has 3 devices but there are 8"),
    ("tensor=8", "tp", 32, "parameter 'blocks/attn/k/kernel': its 'kv_heads' dimension of 2 does not divide over mesh "
                           r"axes \('tensor',\) of size 8; change the mesh or the model size"),
    ("data=2,sequence=4", "sp", 30, "--seq 30 does not divide over the 4-way sequence axis of mesh data=2, sequence=4"),
    ("data=4,fsdp=2", "fsdp", 32, "--batch 4 does not divide over the 8 data-parallel devices"),
])
def test_bad_meshes_stop_before_training(tmp_path, mesh, sharding, seq, message):
    run = RunConfig(tmp_path, batch_size=4 if "batch" in message else 8, seq_len=seq, progress=False, mesh=mesh,
                    sharding=sharding)
    with pytest.raises(TrainingError, match=message):
        train(MODEL, TrainConfig(total_steps=1, warmup_steps=0), run, TOKENS)


PROCESS_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from llmjax.parallel.distributed import initialize
if len(sys.argv) > 2:
    initialize(sys.argv[2], 2, int(sys.argv[3]), timeout_s=60)
from llmjax.config import TrainConfig, get_config
from llmjax.data.loader import ArrayTokens
from llmjax.train.loop import RunConfig, train
tokens = ArrayTokens(np.random.default_rng(0).integers(0, 301, 30000).astype(np.uint16))
run = RunConfig(Path(sys.argv[1]), batch_size=8, seq_len=32, log_every=1, eval_every=1000, save_every=1000,
                sample_tokens=0, progress=False, async_checkpoints=False, mesh="data=2,fsdp=2", sharding="fsdp")
train(get_config("llama-tiny"), TrainConfig(lr=3e-3, warmup_steps=0, total_steps=3), run, tokens)
"""


def python(*args, devices: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """2 processes x 2 CPU devices through jax.distributed give the losses of 1 process x 4 devices."""
    address = f"127.0.0.1:{free_port()}"
    workers = [python(tmp_path / "two", address, index, devices=2) for index in range(2)]
    single = python(tmp_path / "one", devices=4)
    for process in [*workers, single]:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"] for name in ("one", "two")}
    assert len(losses["two"]) == 3
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()


def run_train_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments", "train", "--data", "/nonexistent", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})


def test_unreachable_coordinator_times_out_with_a_clear_message():
    port = free_port()
    result = run_train_cli("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                           "--init-timeout", "2")
    assert result.returncode == 2
    assert f"cannot reach the coordinator at 127.0.0.1:{port} after 2 s" in result.stderr


def test_partial_multi_process_flags_are_refused():
    result = run_train_cli("--coordinator", "127.0.0.1:1234")
    assert result.returncode == 2
    assert "--coordinator given without --num-processes, --process-id" in result.stderr
