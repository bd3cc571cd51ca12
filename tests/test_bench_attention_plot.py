"""experiments/bench_attention.py's chart: a point per measured sequence length on every line (CPU, synthetic rows)."""

from argparse import Namespace
from dataclasses import asdict

from llmjax.experiments import bench_attention

IMPLS = ["pallas", "cudnn", "xla"]


def synthetic_rows(seqs: list[int], head_dims: list[int], backward: bool = True) -> list[dict]:
    """Rows as main() writes them, for the shapes a `--seqs SEQS --head-dims HEAD_DIMS` run measures."""
    args = Namespace(quick=False, seqs=seqs, tokens=16384, head_dims=head_dims)
    rows = []
    for index, shape in enumerate(bench_attention.shapes(args)):
        results = {}
        for offset, impl in enumerate(IMPLS):
            result = {"forward_tflops": 100.0 + shape.seq / 1024 + offset}
            if backward:
                result["forward_backward_tflops"] = 80.0 + shape.seq / 1024 + offset
            results[impl] = result
        rows.append({"shape": shape.label, "kind": "headline" if index < 2 else "sweep", **asdict(shape),
                     "results": results})
    return rows


def test_every_line_has_a_point_per_sequence_length(tmp_path):
    """--seqs 4096 16384: the s4096 d128 causal shape is the headline's (the sweep does not repeat it), yet its line
    still has both lengths."""
    rows = synthetic_rows([4096, 16384], [64, 128])
    assert [r["kind"] for r in rows if r["seq"] == 4096 and r["head_dim"] == 128 and r["causal"]] == ["headline"] * 2
    figure = bench_attention.plot(rows, IMPLS, tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 0
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == [f"{mask}, head dim {head_dim}, bf16: {direction}" for head_dim, mask in
                      [(128, "causal"), (128, "full"), (64, "causal"), (64, "full")]
                      for direction in ("forward", "forward + backward")]
    for axis in figure.axes:
        lines = axis.get_lines()
        assert [line.get_label() for line in lines] == IMPLS
        assert all(list(line.get_xdata()) == [4096, 16384] for line in lines), axis.get_title()
        assert axis.get_xscale() == "log"
        assert [label.get_text() for label in axis.get_xticklabels()] == ["4k", "16k"]
    forward_128_causal = figure.axes[0].get_lines()[0]
    assert list(forward_128_causal.get_ydata()) == [104.0, 116.0]


def test_a_missing_measurement_leaves_out_its_point_only(tmp_path):
    rows = synthetic_rows([1024, 4096, 16384], [128], backward=False)
    for row in rows:
        if row["seq"] == 16384:
            row["results"]["xla"] = {"skipped": "score matrix too large to materialize"}
    figure = bench_attention.plot(rows, IMPLS, tmp_path / "attention.png")
    assert len(figure.axes) == 2  # causal and full, forward only: no empty forward + backward panels
    for axis in figure.axes:
        points = {line.get_label(): list(line.get_xdata()) for line in axis.get_lines()}
        assert points == {"pallas": [1024, 4096, 16384], "cudnn": [1024, 4096, 16384], "xla": [1024, 4096]}
        assert [label.get_text() for label in axis.get_xticklabels()] == ["1k", "4k", "16k"]


def test_nothing_measured_draws_nothing(tmp_path):
    rows = synthetic_rows([4096], [128])
    for row in rows:
        row["results"] = {impl: {"error": "unavailable"} for impl in IMPLS}
    assert bench_attention.plot(rows, IMPLS, tmp_path / "attention.png") is None
    assert not (tmp_path / "attention.png").exists()


def test_a_quick_cpu_run_writes_its_chart(tmp_path, capsys):
    """The benchmark's own path on the CPU (the XLA reference only, one small shape)."""
    out = tmp_path / "attention.json"
    assert bench_attention.main(["--quick", "--repeats", "1", "--inner", "1", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_table_has_a_ratio_column_per_timed_peer():
    """pallas / cudnn and pallas / tokamax where both sides were timed; '-' where a peer could not run."""
    rows = synthetic_rows([4096], [128])
    for row in rows:
        row["results"]["tokamax"] = {"forward_tflops": 50.0} if row["seq"] == 4096 else {"error": "unavailable"}
    text = bench_attention.table(rows, IMPLS + ["tokamax"], "forward_tflops")
    lines = text.splitlines()
    assert lines[0] == "| shape | pallas | cudnn | xla | tokamax | pallas / cudnn | pallas / tokamax |"
    assert lines[1].count("---") == 7
    headline = lines[2].split(" | ")  # pallas 104, cudnn 105, tokamax 50
    assert headline[-2] == f"{104 / 105:.2f}x" and headline[-1] == f"{104 / 50:.2f}x |"
    assert bench_attention.table(rows, ["cudnn", "xla"], "forward_tflops").splitlines()[0] == "| shape | cudnn | xla |"


def test_tokamax_missing_is_reported_not_fatal(monkeypatch):
    """Without tokamax installed (CI), its column says why; the other implementations still run."""
    import builtins

    real_import = builtins.__import__

    def no_tokamax(name, *args, **kwargs):
        if name == "tokamax":
            raise ImportError("No module named 'tokamax'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokamax)
    shape = bench_attention.Shape(1, 128, 2, 2, 32, True)
    result = bench_attention.time_jax("tokamax", shape, Namespace(repeats=1, inner=1, no_backward=True))
    assert result == {"error": "unavailable: No module named 'tokamax'"}
