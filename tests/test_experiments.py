"""The experiments a user runs, at CI size: quickstart end to end, train, and their bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.data.loader import ArrayTokens
from llmjax.train.loop import RunConfig, TrainingError, train

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(*args, cwd=ROOT):
    """A clean environment, but for the test run's shared compilation cache and compile settings (conftest.py)."""
    cache = {k: v for k, v in os.environ.items()
             if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_DISABLE_MOST_OPTIMIZATIONS"))}
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **cache})


def test_quickstart_runs_end_to_end(tmp_path):
    result = run_experiment("quickstart", "--run-dir", str(tmp_path), "--max-files", "40", "--steps", "12",
                            "--tokenizer-mb", "0.5", "--vocab-size", "400", "--batch", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "unigram entropy of the validation split" in result.stdout and "sample (temperature 0.8" in result.stdout
    summary = json.loads((tmp_path / "quickstart.json").read_text())
    assert summary["steps"] == 12 and np.isfinite(summary["val_loss"])
    for name in ("loss.png", "metrics.jsonl", "tensorboard", "tokenizer.json", "tokens/train/index.json",
                 "checkpoints/12"):
        assert (tmp_path / name).exists(), name


def test_tokenize_then_train_from_the_command_line(tmp_path):
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    result = run_experiment("tokenize", "--tokenizer", "bytes", "--corpus", str(stdlib / "json"), str(stdlib / "email"),
                            "--out", str(tmp_path / "tokens"), "--no-progress")
    assert result.returncode == 0, result.stderr
    result = run_experiment("train", "--data", str(tmp_path / "tokens"), "--model", "gpt2-tiny", "--steps", "4",
                            "--batch", "8", "--seq", "32", "--eval-every", "2", "--eval-batches", "1",
                            "--log-every", "1", "--run-dir", str(tmp_path / "run"), "--no-progress",
                            "--sample-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-2])["end_step"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "validation"] == [2, 4]
    assert all("sample" in r for r in records if r["kind"] == "validation")
    for folder in ("tokens", "run"):  # the tokenizer travels with the shards, and into the run for --ckpt RUN
        assert json.loads((tmp_path / folder / "tokenizer.json").read_text())["type"] == "bytes"


def test_train_reads_the_tokenizer_beside_moved_shards(tmp_path):
    """A token folder moved to another machine (the index's absolute tokenizer path gone) still gives training its
    tokenizer: the copy tokenize wrote beside the shards."""
    from llmjax.experiments.train import open_data
    from llmjax.tokenizer.bpe_train import train_bpe

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n in range(4):
        (corpus / f"f{n}.py").write_text(f"def f{n}(x):\n    return x + {n}\n" * (n + 3))
    tokenizer = train_bpe([p.read_text() for p in sorted(corpus.iterdir())] * 5, 270, num_workers=1, progress=False)
    tokenizer.save(tmp_path / "bpe.json")
    result = run_experiment("tokenize", "--tokenizer", str(tmp_path / "bpe.json"), "--corpus", str(corpus),
                            "--out", str(tmp_path / "tokens"), "--split", "train", "--no-progress")
    assert result.returncode == 0, result.stderr
    (tmp_path / "bpe.json").unlink()
    moved = (tmp_path / "tokens").rename(tmp_path / "moved")
    _, _, loaded = open_data(moved)
    assert loaded is not None and loaded.fingerprint() == tokenizer.fingerprint()


def test_train_without_shards_is_one_clear_error(tmp_path):
    result = run_experiment("train", "--data", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"no shards in {tmp_path}/train: run `python -m experiments tokenize --out {tmp_path}` first")


def tokens(n=6000, seed=0):
    return ArrayTokens(np.random.default_rng(seed).integers(0, 301, n).astype(np.uint16))


def test_data_parallel_training_on_eight_devices(tmp_path):
    """The loop shards each batch over every device (8 simulated CPUs here) and still learns."""
    import jax

    assert jax.device_count() == 8
    run = RunConfig(tmp_path, batch_size=8, seq_len=16, log_every=1, eval_every=10, save_every=10,
                    eval_batches=1, sample_tokens=0, progress=False)
    repeated = ArrayTokens(np.tile(np.arange(50, dtype=np.uint16), 40))  # a pattern to learn
    summary = train(get_config("gpt2-tiny"), TrainConfig(lr=1e-2, warmup_steps=2, total_steps=20), run, repeated,
                    repeated)
    assert summary["end_step"] == 20 and summary["val_loss"] < 3.0  # ln(301) = 5.7 at the start


def test_batch_that_does_not_divide_across_devices_is_refused(tmp_path):
    run = RunConfig(tmp_path, batch_size=6, seq_len=16, progress=False)
    with pytest.raises(TrainingError, match="--batch 6 does not divide over the 8 data-parallel devices of mesh "
                                            "data=8, sharding auto; use a multiple of 8"):
        train(get_config("gpt2-tiny"), TrainConfig(total_steps=2, warmup_steps=0), run, tokens())


def test_too_little_data_is_refused(tmp_path):
    run = RunConfig(tmp_path, batch_size=8, seq_len=64, progress=False)
    with pytest.raises(TrainingError, match="the training data has 50 tokens, fewer than one window of --seq 64"):
        train(get_config("gpt2-tiny"), TrainConfig(total_steps=2, warmup_steps=0), run, tokens(50))


def test_diverging_loss_stops_with_the_step_and_a_hint(tmp_path):
    run = RunConfig(tmp_path, batch_size=8, seq_len=16, log_every=1, progress=False)
    with pytest.raises(TrainingError, match=r"loss is nan at step \d+: lower --lr"):
        train(get_config("gpt2-tiny"), TrainConfig(lr=1e30, warmup_steps=0, total_steps=6, grad_clip=None), run,
              tokens())
