"""finetune_lora (QLoRA) and quantize end to end on a tiny trained run, and their bad input."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.data.loader import ArrayTokens
from llmjax.train.loop import RunConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A gpt2-tiny trained for a few steps on bytes, with tokenizer.json, and a text file to fine-tune on."""
    from llmjax.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("run")
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    tokenizer = load_tokenizer("bytes")
    tokenizer.save(folder / "tokenizer.json")
    tokens = ArrayTokens(np.asarray(tokenizer.encode(text), np.uint16))
    run_cfg = RunConfig(run_dir=folder, batch_size=8, seq_len=32, eval_every=100, save_every=3, progress=False,
                        sample_tokens=0, async_checkpoints=False)
    train(get_config("gpt2-tiny"), TrainConfig(lr=3e-3, warmup_steps=1, total_steps=3), run_cfg, tokens)
    data = folder / "finetune.txt"
    data.write_text(Path(sysconfig.get_paths()["stdlib"], "json", "encoder.py").read_text())
    return folder, data


def test_qlora_finetune_end_to_end_and_resume(run, tmp_path, capsys):
    from experiments.finetune_lora import main

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
    from experiments.quantize import main

    folder, data = run
    out = tmp_path / "q.json"
    assert main(["--ckpt", str(folder), "--data", str(data), "--group", "16", "--nf4-group", "16", "--bits", "3",
                 "--calibration", "8", "--seq", "32", "--eval-batches", "1", "--batch", "2", "--decode-tokens", "4",
                 "--out", str(out)]) == 0
    rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["float", "int8", "int4-RTN", "int4-GPTQ", "nf4", "int3-GPTQ"]
    assert rows["int4-RTN"]["linear_bytes"] < rows["int8"]["linear_bytes"] < rows["float"]["linear_bytes"]
    assert abs(rows["int8"]["perplexity"] / rows["float"]["perplexity"] - 1) < 0.01
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    with pytest.raises(SystemExit, match="does not divide the input dimension 48"):
        main(["--ckpt", str(folder), "--data", str(data), "--group", "32", "--seq", "32", "--decode-tokens", "0",
              "--out", str(out)])
