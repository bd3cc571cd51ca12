"""experiments/scaling at toy size: the chunked training equals llmjax's train_step, the sweep resumes from its cache
(a rerun trains nothing new), fits and the check run from a cache of synthetic runs, the time budget, the plan and
its errors."""

import json

import jax
import numpy as np
import pytest

from llmjax import scaling
from llmjax.experiments import scaling as experiment

LAW = dict(E=1.0, A=20.0, B=20.0, alpha=0.5, beta=0.5)  # optimum at D / N = (B / A)^2 = 1: --tokens-per-param 1


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from llmjax.experiments import tokenize

    root = tmp_path_factory.mktemp("scaling_corpus")
    for name, shift in (("a.py", 0), ("b.py", 3)):
        (root / name).write_text("".join(f"def f{i}(x):\n    return x * {i + shift} + {i % 7}\n" for i in range(700)))
    assert tokenize.main(["--tokenizer", "bytes", "--corpus", str(root / "a.py"), str(root / "b.py"), "--out",
                          str(root / "tokens"), "--no-progress"]) in (0, None)
    return root / "tokens"


def read_report(out):
    return json.loads((out / "report.json").read_text())


def test_chunked_steps_equal_train_step():
    from llmjax.config import TrainConfig
    from llmjax.data.loader import batch_at
    from llmjax.train.state import init_train_state
    from llmjax.train.step import eval_step, train_step, windows_to_batch

    args = experiment.parse_args(["--quick", "--chunk-steps", "2", "--min-steps", "1"])
    data = experiment.open_sweep_data(args, 301)
    sweep = experiment.make_sweep(args, data)
    run = scaling.PlannedRun(1e6, sweep.models[2], steps=3, batch_tokens=args.batch * args.seq)  # 2 chunks, 1 padded
    identity = experiment.run_identity(sweep, run, args)
    record = experiment.Trainer(sweep, args).train(run, identity, "sweep")

    cfg = experiment.model_config(sweep, run.model, args)
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=identity["warmup_steps"], total_steps=3,
                            weight_decay=args.weight_decay)
    state = init_train_state(cfg, train_cfg, jax.random.key(args.seed))
    step = jax.jit(train_step, static_argnames=("model_cfg", "train_cfg"))
    expected = []
    for index in range(3):
        windows = batch_at(data.train, index, batch_size=args.batch, seq_len=args.seq, seed=args.seed)
        state, metrics = step(state, windows_to_batch(windows), model_cfg=cfg, train_cfg=train_cfg)
        expected.append(float(metrics["loss"]))
    np.testing.assert_allclose(record["train_losses"], expected, rtol=2e-5)
    assert expected[0] != expected[2]  # it learns (or at least moves)
    sums = [eval_step(state.params, windows_to_batch(batch_at(data.validation, i, batch_size=args.batch,
                                                              seq_len=args.seq, seed=args.seed)),
                      model_cfg=cfg, train_cfg=train_cfg) for i in range(args.eval_batches)]
    val_loss = sum(float(s["nll_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)
    assert record["val_loss"] == pytest.approx(val_loss, rel=2e-5)
    assert record["tokens"] == 3 * 32 and record["flops"] == 6 * run.model.non_embedding_params * 96
    assert record["tokens_per_second"] > 0 and record["key"] == experiment.run_key(identity)


def test_quick_sweep_resumes_from_its_cache(tokens, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--quick", "--data", str(tokens), "--out", str(out), "--bootstrap", "5"]
    assert experiment.main(argv) == 0
    first = read_report(out)
    planned = first["counts"]["planned"]
    assert planned == 6 and first["counts"] == {"planned": 6, "cached": 0, "trained": 6, "left": 0}
    assert first["complete"] and len(list((out / "runs").glob("*.json"))) == 6
    assert all(np.isfinite(r["val_loss"]) and r["tokens"] == r["steps"] * 32 for r in first["runs"])
    assert {r["budget"] for r in first["runs"]} == {2e6, 6e6}
    assert (out / "isoflop.png").stat().st_size > 0 and (out / "predicted.png").stat().st_size > 0

    assert experiment.main(argv) == 0  # a rerun: everything from the cache
    second = read_report(out)
    assert second["counts"] == {"planned": 6, "cached": 6, "trained": 0, "left": 0}
    assert [r["val_loss"] for r in second["runs"]] == [r["val_loss"] for r in first["runs"]]

    killed = sorted((out / "runs").glob("*.json"))[0]  # as if killed before that run was written
    killed.unlink()
    (out / "runs" / "torn.json.tmp").write_text("{")  # a temporary file of the write the kill interrupted
    assert experiment.main(argv) == 0
    third = read_report(out)
    assert third["counts"] == {"planned": 6, "cached": 5, "trained": 1, "left": 0} and killed.is_file()
    assert "6 sweep runs: 5 cached" in capsys.readouterr().out


def synthetic_cache(flags, out):
    """Writes a cache of the sweep these flags plan, with losses from LAW; returns the planned runs."""
    args = experiment.parse_args(flags)
    sweep = experiment.make_sweep(args, experiment.open_sweep_data(args, 301))
    (out / "runs").mkdir(parents=True)
    for run in sweep.runs:
        identity = experiment.run_identity(sweep, run, args)
        n, d = run.model.non_embedding_params, run.tokens
        loss = LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]
        record = {"key": experiment.run_key(identity), "non_embedding_params": n,
                  "total_params": run.model.total_params,
                  "steps": run.steps, "tokens": d, "flops": run.flops, "val_loss": loss, "final_train_loss": loss,
                  "train_seconds": 0.001 * run.steps, "eval_seconds": 0.01, "compile_seconds": 1.0,
                  "model": run.model.name, "config": identity}
        (out / "runs" / f"{record['key']}.json").write_text(json.dumps(record))
    return sweep.runs


def test_fits_and_the_check_run_from_a_cache_of_synthetic_runs(tmp_path, capsys):
    out = tmp_path / "synthetic"
    flags = ["--quick", "--ladder", "1x8,2x8,1x16,2x16,3x16,4x16,4x24,6x24", "--budgets", "2e7,6e7,2e8",
             "--tokens-per-param", "1",
             "--sizes-per-budget", "5", "--min-steps", "1", "--out", str(out), "--bootstrap", "30",
             "--predict-factor", "3", "--check"]
    runs = synthetic_cache(flags, out)
    assert experiment.main(flags) == 0
    report = read_report(out)
    assert report["counts"] == {"planned": len(runs) + 1, "cached": len(runs), "trained": 1, "left": 0}
    fits = report["fits"]
    for name, value in LAW.items():  # noise-free losses of the law itself
        assert fits["loss_law"][name] == pytest.approx(value, rel=2e-3), name
    assert fits["compute_optimal"]["n_law"]["exponent"] == pytest.approx(0.5, abs=0.05)
    assert fits["compute_optimal"]["d_law"]["exponent"] == pytest.approx(0.5, abs=0.05)
    assert len(fits["isoflop"]) == 3 and fits["bootstrap"]["samples"] >= 25
    low, high = fits["intervals"]["alpha"]
    assert low <= 0.5 + 1e-6 and high >= 0.5 - 1e-6
    prediction = fits["prediction"]
    assert prediction["budget"] == 6e8 and prediction["tokens"] * prediction["n_params"] * 6 == pytest.approx(6e8)

    check = report["check"]  # trained for real (random tokens): its loss is nothing like the synthetic law's
    n, d = check["n_params"], check["tokens"]
    assert check["predicted_loss"] == pytest.approx(LAW["E"] + LAW["A"] / n ** 0.5 + LAW["B"] / d ** 0.5, rel=2e-3)
    assert check["relative_error"] == pytest.approx((check["predicted_loss"] - check["actual_loss"])
                                                    / check["actual_loss"])
    assert check["tokens"] == pytest.approx(6e8 / (6 * n), abs=16) and report["complete"]
    assert [r["role"] for r in report["runs"]].count("check") == 1
    assert (out / "laws.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "prediction at 6e+08 FLOPs" in text and "relative error" in text


def test_time_budget_zero_trains_nothing_and_says_what_is_left(tmp_path, capsys):
    out = tmp_path / "none"
    assert experiment.main(["--quick", "--out", str(out), "--time-budget-s", "0"]) == 0
    report = read_report(out)
    assert report["counts"]["trained"] == 0 and report["counts"]["left"] == 6 and not report["complete"]
    assert len(report["left"]) == 6 and not list((out / "runs").glob("*.json"))
    assert "left to do: 6 run(s)" in capsys.readouterr().out


def test_plan_only_prints_the_table_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "plan"
    assert experiment.main(["--quick", "--out", str(out), "--plan-only"]) == 0
    text = capsys.readouterr().out
    assert "check (guess)" in text and "estimated: sweep" in text and text.count("sweep ") >= 6
    assert not out.exists()


def test_budgets_that_allow_no_model_name_the_smallest_feasible_one(tmp_path, capsys):
    assert experiment.main(["--quick", "--out", str(tmp_path), "--budgets", "1e3,2e6", "--plan-only"]) == 2
    error = capsys.readouterr().err
    assert "budget 1e+03 FLOPs allows no model" in error and "smallest feasible budget is" in error


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "1e12,abc"], "expected comma-separated numbers"),
    (["--budgets", "1e12,-3"], "budgets must be positive"),
    (["--budgets", "1e12,1e12"], "a budget is repeated"),
    (["--ladder", "2x64,3y96"], "ladder entry '3y96'"),
    (["--ladder", "2x48", "--head-dim", "32"], "multiple of --head-dim 32"),
    (["--batch", "0"], "--batch=0: must be a positive integer"),
    (["--lr", "0"], "--lr=0.0: must be positive"),
    (["--warmup-fraction", "1"], "--warmup-fraction=1.0"),
    (["--time-budget-s", "-1"], "--time-budget-s=-1.0"),
])
def test_bad_flags_are_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        experiment.parse_args(argv)
    assert message in capsys.readouterr().err
