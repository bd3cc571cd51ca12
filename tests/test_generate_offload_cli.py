"""The generate_offload / bench_offload commands: --quick smoke runs on the CPU and their one-line errors."""

import json

import pytest

from llmjax.experiments import bench_offload, generate_offload


def test_generate_offload_quick_run_reports_prediction_and_measurement(tmp_path, capsys):
    out = tmp_path / "run.json"
    generate_offload.main(["--quick", "--gpu-memory", "1MiB", "--placement", "disk", "--host-quant", "int8",
                           "--micro-batches", "4", "--disk", str(tmp_path / "layers"),
                           "--profile", str(tmp_path / "trace"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["measured_tokens_per_s"] > 0 and result["predicted_tokens_per_s"] > 0
    assert result["placement"].startswith("weights: 2 disk (int8)") and result["micro_batches"] == 4
    assert len(list((tmp_path / "layers").glob("layer_*.safetensors"))) == 2
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # the measured run's profile
    printed = capsys.readouterr().out
    assert "placement:" in printed and "predicted:" in printed and "measured:" in printed


def test_budget_below_the_minimum_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="below the minimum .*raise --gpu-memory to at least"):
        generate_offload.main(["--quick", "--gpu-memory", "1KiB", "--out", str(tmp_path / "x.json")])


def test_a_placement_the_budget_cannot_hold_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--placement device needs about .* over --gpu-memory"):
        generate_offload.main(["--quick", "--gpu-memory", "380KiB", "--placement", "device",
                               "--out", str(tmp_path / "x.json")])


def test_bad_gpu_memory_and_micro_batches(tmp_path):
    with pytest.raises(SystemExit, match="--gpu-memory 'lots'"):
        generate_offload.main(["--quick", "--gpu-memory", "lots", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        generate_offload.main(["--quick", "--micro-batches", "3"])
    with pytest.raises(SystemExit):  # the cost model picks the batch only with its own placement
        generate_offload.main(["--quick", "--batch", "auto", "--placement", "host"])
    with pytest.raises(SystemExit):
        generate_offload.main(["--quick", "--batch", "many"])


def test_the_host_formats_the_flags_offer_are_the_offload_modules():
    from llmjax.infer import offload

    assert generate_offload.HOST_FORMATS == offload.HOST_FORMATS


def test_generate_offload_batch_auto_takes_the_cost_models_batch(tmp_path, capsys):
    out = tmp_path / "run.json"
    generate_offload.main(["--quick", "--gpu-memory", "400KiB", "--batch", "auto", "--host-quant", "int4",
                           "--gen-len", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["batch"] > 1 and result["predicted_device_bytes"] <= 400 * 1024
    assert result["launch_seconds"] >= 0 and result["measured_tokens_per_s"] > 0


def test_bench_offload_quick_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_offload.main(["--quick", "--gpu-memory", "400KiB", "--gen-lens", "4",
                        "--methods", "ours,layer_by_layer_batch1,all_on_device,hf_device_map_auto", "--out", str(out),
                        "--profile", str(tmp_path / "trace")])
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["ours"]["tokens_per_s"] > 0 and rows["layer_by_layer_batch1"]["batch"] == 1
    assert result["baseline_batch"] >= 1  # --baseline-batch max: the largest the budget holds
    assert rows["layer_by_layer_batch1"]["bytes_moved_per_step"] > 0 and result["bandwidths"]["h2d"] > 0
    assert rows["all_on_device"]["tokens_per_s"] > 0
    assert "tokens_per_s" in rows["hf_device_map_auto"] or "skipped" in rows["hf_device_map_auto"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # one more, untimed run of ours, traced
    assert "ours" in capsys.readouterr().out
