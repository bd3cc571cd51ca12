"""`experiments compare_runs`: two runs' final losses, their relative difference, the overlay PNG, bad folders."""

import json

import pytest

from llmjax.experiments import compare_runs


def write_run(folder, train_losses, val_losses):
    folder.mkdir()
    lines = [{"step": 10 * (i + 1), "kind": "train", "loss": loss} for i, loss in enumerate(train_losses)]
    lines += [{"step": 10 * len(train_losses) * (i + 1) // len(val_losses), "kind": "validation", "loss": loss}
              for i, loss in enumerate(val_losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_compare_two_runs(tmp_path, capsys):
    bf16 = write_run(tmp_path / "bf16", [5.0, 4.0, 3.0, 2.0], [3.5, 2.0])
    fp8 = write_run(tmp_path / "fp8", [5.0, 4.1, 3.1, 2.1, float("nan")], [3.6, 2.02])
    out = tmp_path / "out"
    assert compare_runs.main([str(bf16), str(fp8), "--tail", "2", "--labels", "bf16,fp8", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "+1.00%" in table and "+4.00%" in table  # validation 2.02 vs 2.0; train mean(3.1, 2.1) vs mean(3, 2)
    result = json.loads((out / "comparison.json").read_text())["final"]
    assert result["bf16"]["train_loss"] == 2.5 and result["fp8"]["train_loss"] == pytest.approx(2.6)  # NaN skipped
    assert result["fp8"]["val_vs_first"] == pytest.approx(0.01) and result["bf16"]["val_vs_first"] == 0.0
    assert (out / "loss_comparison.png").stat().st_size > 10_000


def test_bad_runs_are_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run = write_run(tmp_path / "run", [2.0], [2.0])
    assert compare_runs.main([str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    assert compare_runs.main([str(run), "--labels", "a,b", "--out", str(tmp_path / "out")]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
