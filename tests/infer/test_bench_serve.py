"""bench_serve end to end on CPU with a tiny model: every mode at two rates, the JSON and the PNG, and
figures that must hold whatever the timing (all requests completed with their token counts, the paged
pool fuller than a contiguous cache, prefix hits only with prefix caching)."""

import json

from llmjax.experiments import bench_serve

TINY = ("--model llama-tiny --max-model-len 64 --system-prompts 2 --system-len 16 --prompt-median 8 --output-median 8 "
        "--max-prompt 40 --max-output 20 --num-blocks 64 --block-size 4 --max-running 8 --batch-buckets 2,8 "
        "--max-prefill-rows 4 --table-width-buckets 16 --max-tokens-per-step 32 "
        "--num-requests 24").split()


def test_bench_serve_smoke(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert bench_serve.main([*TINY, "--rates", "inf,400", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = {(run["mode"], run["rate"]): run["result"] for run in report["runs"]}
    assert set(runs) == {(mode, rate) for mode in bench_serve.MODES for rate in (float("inf"), 400.0)}
    workload = bench_serve.make_workload(bench_serve.parse_args(TINY), 301, 64)
    for (mode, rate), result in runs.items():
        assert result["completed"] == 24 and result["output_tokens"] == sum(r.max_tokens for r in workload)
        assert result["kv_utilization"]["paged"] > result["kv_utilization"]["contiguous"]
        assert (result["prefix_hit_rate"] > 0) == (mode == "prefix")
        assert result["ttft_s"]["p50"] <= result["latency_s"]["p50"]
    assert "continuous_vs_static_at_rate_inf" in report["headline"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "TTFT p50/p90/p99 ms" in capsys.readouterr().out
    out.with_suffix(".png").unlink()
    assert bench_serve.main(["--replot", str(out)]) == 0  # the table and the PNG again from the JSON
    assert out.with_suffix(".png").stat().st_size > 0 and "continuous_vs_static" in capsys.readouterr().out


def test_bench_serve_checks_and_sync_comparison(tmp_path):
    """--check-outputs (engine vs generate, float32: all equal), --program-times and --compare-sync (the same
    modes with async scheduling off, at the first rate, compared with each other in the headline)."""
    out = tmp_path / "serve.json"
    assert bench_serve.main([*TINY, "--rates", "inf", "--modes", "static,continuous", "--compare-sync",
                             "static,continuous", "--check-outputs", "3", "--check-tokens", "6", "--program-times", "2",
                             "--no-plot", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [run["mode"] for run in report["runs"]] == ["static", "continuous", "static-sync", "continuous-sync"]
    assert {"continuous_vs_static_at_rate_inf", "continuous-sync_vs_static-sync_at_rate_inf"} <= set(report["headline"])
    check = report["check_outputs"]["float32"]
    assert check["async"] == check["sync"] == {"equal": 3, "differ": []}
    assert any(name.startswith("decode [8]") for name in report["program_ms"])
    assert any(name.endswith("no attention") for name in report["program_ms"])
    for run in report["runs"]:
        phases = run["result"]["step_phase_ms"]
        assert set(phases) == {"schedule", "dispatch", "wait", "collect"} and min(phases.values()) >= 0


def test_workload_is_seeded_and_fits_the_context():
    args = bench_serve.parse_args([*TINY, "--num-requests", "200"])
    a, b = bench_serve.make_workload(args, 301, 64), bench_serve.make_workload(args, 301, 64)
    fields = lambda requests: [(r.prompt, r.max_tokens, r.arrival_unit) for r in requests]  # noqa: E731
    assert fields(a) == fields(b)
    assert all(len(r.prompt) + r.max_tokens <= 64 and r.max_tokens >= 1 for r in a)
    gaps = [y.arrival_unit - x.arrival_unit for x, y in zip(a, a[1:])]
    assert min(gaps) >= 0 and 0.7 < sum(gaps) / len(gaps) < 1.3  # Poisson at rate 1
    assert sum(r.prompt[:16] in ([s.prompt[:16] for s in a[:1]]) for r in a) > 20  # shared system prompts


def test_bench_serve_over_http(tmp_path):
    """--http: the same load through a real server (uvicorn in a thread, token-id prompts, streamed)."""
    import threading
    import time

    import jax
    import uvicorn

    from llmjax.config import get_config
    from llmjax.infer.engine import Engine, EngineConfig
    from llmjax.infer.server import create_app
    from llmjax.model import init_params
    from llmjax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("bytes")
    cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size)
    engine = Engine(init_params(cfg, jax.random.key(0)), cfg, EngineConfig(
        num_blocks=64, block_size=4, max_running=8, max_tokens_per_step=32, batch_buckets=(8,),
        prefill_row_buckets=(4,), chunk_buckets=(32,)))
    app = create_app(engine, tokenizer, model_name="tiny", max_model_len=cfg.max_seq_len)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    out = tmp_path / "http.json"
    try:
        assert bench_serve.main([*TINY, "--http", url, "--vocab-size", str(cfg.vocab_size), "--rates", "inf",
                                 "--num-requests", "12", "--out", str(out)]) == 0
    finally:
        server.should_exit = True
        thread.join(30)
    result = json.loads(out.read_text())["runs"][0]["result"]
    workload = bench_serve.make_workload(bench_serve.parse_args([*TINY, "--num-requests", "12"]), cfg.vocab_size, 64)
    assert result["errors"] == 0 and result["completed"] == 12
    assert result["output_tokens"] == sum(r.max_tokens for r in workload)
    assert engine.manager.allocator.num_used == 0
