"""finetune_lora (QLoRA) and quantize end to end on a tiny trained run, and their bad input."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as `experiments train` leaves it (a gpt2-tiny checkpoint, tokenizer.json over bytes) and a
    text file to fine-tune on. The weights are freshly initialized: these tests check the plumbing."""
    import jax

    from llmjax.tokenizer import load_tokenizer
    from llmjax.train.checkpoint import Checkpointer, run_record
    from llmjax.train.step import init_train_state

    folder = tmp_path_factory.mktemp("run")
    load_tokenizer("bytes").save(folder / "tokenizer.json")
    cfg, train_cfg = get_config("gpt2-tiny"), TrainConfig(warmup_steps=1, total_steps=3)
    checkpointer = Checkpointer(folder / "checkpoints", async_save=False)
    checkpointer.save(init_train_state(cfg, train_cfg, jax.random.key(0)),
                      record=run_record(cfg, train_cfg, loader_state={}, seed=0))
    checkpointer.close()
    data = folder / "finetune.txt"
    data.write_text(Path(sysconfig.get_paths()["stdlib"], "json", "encoder.py").read_text())
    return folder, data


def test_qlora_finetune_end_to_end_and_resume(run, tmp_path, capsys):
    from llmjax.experiments.finetune_lora import main

    folder, data = run
    common = ["--ckpt", str(folder), "--data", str(data), "--quant", "nf4", "--group", "16", "--batch", "4",
              "--seq", "32", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2",
              "--run-dir", str(tmp_path)]
    assert main([*common, "--steps", "4"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    for name in ("loss.png", "checkpoints/4", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (tmp_path / name).exists(), name
    assert main([*common, "--steps", "6"]) == 0
    assert "resuming" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="matches no linear weight.*blocks/attn/q/kernel"):
        main([*common, "--steps", "6", "--target", "attn/query"])
    with pytest.raises(SystemExit, match="does not exist"):
        main([*common[:2], "--data", str(tmp_path / "missing.txt")])


def test_quantize_table(run, tmp_path):
    from llmjax.experiments.quantize import main

    folder, data = run
    out = tmp_path / "q.json"
    assert main(["--ckpt", str(folder), "--data", str(data), "--group", "16", "--nf4-group", "16", "--bits", "3",
                 "--calibration", "8", "--seq", "32", "--eval-batches", "1", "--batch", "2", "--decode-tokens", "4",
                 "--decode-formats", "float,int4-RTN", "--per-channel-too",
                 "--out", str(out)]) == 0
    rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["float"]["decode_tokens_per_s"] > 0 and rows["int4-RTN"]["decode_tokens_per_s"] > 0
    assert list(rows) == ["float", "int8", "int4-RTN", "int4-GPTQ", "nf4", "int4-RTN per-channel",
                          "int4-GPTQ per-channel", "int3-GPTQ"]
    assert rows["int4-RTN per-channel"]["linear_bytes"] < rows["int4-RTN"]["linear_bytes"]  # fewer scales
    assert rows["int4-RTN"]["linear_bytes"] < rows["int8"]["linear_bytes"] < rows["float"]["linear_bytes"]
    assert abs(rows["int8"]["perplexity"] / rows["float"]["perplexity"] - 1) < 0.01
    with pytest.raises(SystemExit, match="does not divide the input dimension 48"):
        main(["--ckpt", str(folder), "--data", str(data), "--group", "32", "--seq", "32", "--decode-tokens", "0",
              "--out", str(out)])


@pytest.mark.slow
def test_remat_memory_measures_in_its_own_process(tmp_path):
    """--measure-steps runs each (mode, policy) in a child process; the compiled figures come back in the table
    (the device peak only where the backend reports memory stats: GPUs, not CPUs)."""
    from llmjax.experiments.remat_memory import main

    out = tmp_path / "remat.json"
    assert main(["--model", "gpt2-mini", "--set", "num_layers=1", "--batch", "2", "--seq", "16", "--modes", "qlora",
                 "--policies", "full", "--measure-steps", "1", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["mode"] == "qlora" and row["remat"] == "full" and row["arguments"] > 0 and row["temporaries"] > 0
    assert row["peak_estimate"] == row["arguments"] + row["temporaries"] + row["outputs"] - row["aliased"]
    assert "measured_peak" in row and row["step_ms"] > 0
