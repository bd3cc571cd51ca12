"""bench_speculative's whole path (train both models, time target alone / speculative / draft alone, check
greedy outputs, table, JSON, PNG) on the CPU at toy size, so the GPU benchmark does not rot between runs."""

import json

import pytest

from llmjax.experiments import bench_speculative


@pytest.mark.slow
def test_bench_speculative_runs_at_toy_size(tmp_path, capsys):
    """The compared draft has the main draft's shape (another training run of the same config): its rows come from
    the compared-draft path while every jitted program (train step, generate, speculative) is compiled once."""
    out = tmp_path / "bench.json"
    assert bench_speculative.main([
        "--model", "llama-tiny", "--draft", "llama-tiny", "--draft-set", "num_layers=2", "--draft-set", "d_model=16",
        "--train-steps", "2", "--train-batch", "2", "--train-seq", "16", "--corpus-mb", "0.1", "--ks", "2",
        "--prompts", "2", "--prompt-len", "8", "--max-new-tokens", "8", "--repeats", "1",
        "--sampled-temperature", "0.8", "--compare-draft", "llama-tiny:num_layers=2,d_model=16",
        "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(row["config"], row["temperature"]): row for row in results["rows"]}
    other = "llama-tiny (num_layers=2 d_model=16)"  # the compared draft: at the first k, then alone
    assert set(rows) == {("target alone", 0), ("target + draft", 0), ("draft alone", 0), ("target alone", 0.8),
                         ("target + draft", 0.8), (f"target + {other}", 0), (f"{other} alone", 0)}
    assert rows[(f"target + {other}", 0)]["identical"] is True and rows[(f"target + {other}", 0)]["k"] == 2
    assert [d["draft_overrides"] for d in results["compared_drafts"]] == [["num_layers=2", "d_model=16"]]
    assert rows[("target + draft", 0.8)]["identical"] is None and rows[("target + draft", 0.8)]["k"] == 2
    speculative = rows[("target + draft", 0)]
    assert speculative["k"] == 2 and speculative["identical"] is True  # greedy: the target's own tokens
    assert 0 <= speculative["acceptance_rate"] <= 1 and 1 <= speculative["tokens_per_target_call"] <= 3
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    assert results["draft_params"] < results["target_params"] and results["target_training"]["steps"] == 2
    assert out.with_suffix(".png").is_file()
    assert "| target + draft | 0 | 2 |" in capsys.readouterr().out


def test_bench_speculative_bad_flags_are_one_line():
    with pytest.raises(SystemExit, match="--ks '0,2': give draft lengths >= 1"):
        bench_speculative.main(["--model", "llama-tiny", "--draft", "llama-tiny", "--ks", "0,2"])
    with pytest.raises(SystemExit, match="unknown model preset 'llama-nope'"):
        bench_speculative.main(["--model", "llama-nope"])
