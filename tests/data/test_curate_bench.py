"""experiments/bench_dedup on a tiny corpus: planted copies found, precision / recall scored, outputs written."""

import json

import numpy as np
import pytest

from llmjax.experiments import bench_dedup


def test_edited_copy_rate():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(20000))
    copy = bench_dedup.edited_copy(text, 0.03, rng)
    original, edited = set(text.split()), copy.split()
    changed = sum(w not in original for w in edited) + (20000 - sum(w in original for w in edited))
    assert 0.02 * 20000 < changed < 0.04 * 20000  # substitutions + insertions + deletions ~ 3%
    assert bench_dedup.edited_copy(text, 0.0, rng) == text


def test_tiny_benchmark_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"token{k}" for k in rng.integers(0, 5000, size=300)))
    args = ["--corpus", str(corpus), "--planted", "0.5", "--edit-rate", "0.01", "--out", str(tmp_path / "out"),
            "--workers", "1"]
    try:
        import datasketch  # noqa: F401
    except ImportError:
        args.append("--skip-datasketch")
    assert bench_dedup.main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["planted"] == 20 and report["documents"] == 60
    ours = report["results"]["llmjax"]
    assert ours["recall"] >= 0.95 and ours["precision"] >= 0.95
    assert (tmp_path / "out" / "bench_dedup.png").stat().st_size > 0


@pytest.mark.parametrize("flags", [["--workers", "0"], ["--planted", "0"], ["--num-perm", "1"]])
def test_bad_flags(tmp_path, flags, capsys):
    assert bench_dedup.main([*flags, "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
