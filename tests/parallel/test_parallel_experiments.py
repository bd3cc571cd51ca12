"""The parallelism experiments at CI size: sharding_memory's accounting and bench_scaling's table."""

import json

import pytest

from llmjax.experiments import bench_scaling, sharding_memory
from llmjax.config import count_params, get_config


@pytest.fixture(scope="module")
def memory_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    assert sharding_memory.main(["--model", "llama-tiny", "--devices", "2", "--batch", "4", "--seq", "32",
                                 "--out", str(out)]) == 0
    assert (out / "memory.png").is_file()
    return {row["strategy"]: row for row in json.loads((out / "results.json").read_text())["rows"]}


def test_memory_follows_the_zero_stages(memory_rows):
    dp, zero1, zero2, fsdp, tp = (memory_rows[name] for name in ("dp", "zero1", "zero2", "fsdp", "tp"))
    params = 4 * count_params(get_config("llama-tiny"), padded_vocab=True)  # float32
    assert dp["params"] == dp["gradients"] == params and dp["optimizer"] == pytest.approx(2 * params, abs=64)
    assert zero1["params"] == params and zero1["gradients"] == params  # ZeRO-1 cuts only the optimizer state
    assert zero1["optimizer"] == pytest.approx(params, abs=64)
    assert zero2["params"] == params and zero2["gradients"] == params // 2  # ZeRO-2 cuts gradients too
    assert fsdp["params"] == params // 2 and fsdp["gradients"] == params // 2  # ZeRO-3 cuts everything
    assert tp["params"] < params  # Megatron cuts heads, MLP and vocabulary; norms stay whole
    for row in (dp, zero1, zero2, fsdp):  # exact shard bytes agree with the ZeRO paper's formulas
        assert row["params"] + row["gradients"] + row["optimizer"] == pytest.approx(row["formula_states"], abs=64)
    assert all(row["xla_temp"] > 0 and row["activations"] >= 0 for row in memory_rows.values())


def test_bench_scaling_reports_every_strategy_and_device_count(tmp_path, capsys):
    assert bench_scaling.main(["--model", "llama-tiny", "--seq", "32", "--batch-per-device", "2", "--devices", "1", "2",
                               "16", "--strategies", "dp", "fsdp+tp", "--steps", "1", "--warmup", "1",
                               "--out", str(tmp_path)]) == 0
    assert "skipping [16]" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["strategy"], r["devices"]) for r in rows] == [("dp", 1), ("dp", 2), ("fsdp+tp", 2)]
    assert rows[0]["efficiency"] == 1.0 and all(r["tokens_per_second"] > 0 for r in rows)
    assert (tmp_path / "scaling.png").is_file()
