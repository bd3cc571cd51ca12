"""tools/offload_overlap.py on a hand-made trace: which GPU events count as host -> device copies, and how much of
the copy time a kernel overlaps."""

import gzip
import json
from pathlib import Path

import pytest


def write_trace(folder: Path, events: list) -> None:
    run = folder / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0 NVIDIA H100"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(MemcpyH2D)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 5,
             "args": {"name": "Stream #5(Memset,MemcpyD2D,Compute)"}}]
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_copies_kernels_and_their_overlap(tmp_path, load_tool):
    tool = load_tool("offload_overlap")
    span = lambda pid, tid, ts, dur, name: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur,  # noqa: E731
                                            "name": name}
    write_trace(tmp_path, [
        span(1, 7, 0, 100, "copy on a host->device stream"),   # a copy by its stream's name
        span(1, 3, 200, 100, "Memcpy (Pinned -> Device)"),     # a copy by its own name, no "h2d"
        span(1, 4, 400, 50, "MemcpyD2H"),                      # device -> host: neither
        span(1, 5, 50, 100, "gemm_kernel"),                    # overlaps the first copy's last 50 us
        span(1, 5, 250, 20, "fusion_12"),                      # inside the second copy
        span(1, 5, 500, 10, "memset32"),                       # neither
        span(1, 5, 520, 10, "MemcpyD2D"),                      # neither: a device copy on the compute stream
        span(2, 9, 0, 1000, "host work"),                      # not the GPU
    ])
    copies, kernels = tool.gpu_events(tool.trace_events(str(tmp_path)))
    assert sorted(c[2] for c in copies) == ["Memcpy (Pinned -> Device)", "copy on a host->device stream"]
    assert sorted(k[2] for k in kernels) == ["fusion_12", "gemm_kernel"]
    summary = tool.main(str(tmp_path), str(tmp_path / "overlap.png"), 1.0)
    assert summary["copy_busy_ms"] == pytest.approx(0.2) and summary["compute_busy_ms"] == pytest.approx(0.12)
    assert summary["copy_overlapped_by_compute"] == pytest.approx(70 / 200)
    assert (tmp_path / "overlap.png").stat().st_size > 0 and (tmp_path / "overlap.json").exists()


def test_interval_union_and_intersection(load_tool):
    tool = load_tool("offload_overlap")
    merged = tool.union([(5, 8), (0, 2), (1, 3), (7, 9)])
    assert merged == [(0, 3), (5, 9)] and tool.length(merged) == 7
    assert tool.intersection(merged, [(2, 6), (8, 20)]) == 1 + 1 + 1


def test_a_trace_without_kernels_lists_its_event_lines(tmp_path, load_tool, capsys):
    """No kernel on GPU 0: the tool stops with one line, after printing each (process, thread)'s event count."""
    tool = load_tool("offload_overlap")
    copies = [{"ph": "X", "pid": 1, "tid": 7, "ts": 10 * i, "dur": 5, "name": "MemcpyH2D"} for i in range(3)]
    write_trace(tmp_path, copies + [{"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 9, "name": "jit_step"}])
    with pytest.raises(SystemExit, match="3 host -> device copies and 0 kernels"):
        tool.main(str(tmp_path), str(tmp_path / "overlap.png"))
    printed = capsys.readouterr().out.splitlines()
    assert "Stream #7(MemcpyH2D)" in printed[0] and " 3  ['MemcpyH2D']" in printed[0]
    assert "/host:CPU" in printed[1] and "['jit_step']" in printed[1]
