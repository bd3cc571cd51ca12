"""experiments/scaling at toy size: the chunked training equals llmjax's train_step, the sweep resumes from its cache
(a rerun trains nothing new), fits and the check run from a cache of synthetic runs, the time budget, the plan and
its errors."""

import json

import jax
import numpy as np
import pytest

from llmjax import scaling
from llmjax.experiments import scaling as experiment

@pytest.fixture(autouse=True, scope="module")
def quick_compiles():
    """XLA without most optimizations: these toy models compile 2-3x faster on the CPU (the same numbers)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


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


def test_chunked_steps_equal_train_step(tokens):
    from llmjax.config import TrainConfig
    from llmjax.data.loader import batch_at
    from llmjax.train.state import init_train_state
    from llmjax.train.step import train_step, windows_to_batch

    args = experiment.parse_args(["--quick", "--data", str(tokens)])  # chunks of 4 steps
    data = experiment.open_sweep_data(args, 301)
    sweep = experiment.make_sweep(args, data)
    run = scaling.PlannedRun(1e6, sweep.models[2], steps=5, batch_tokens=args.batch * args.seq)  # 2 chunks, 3 padded
    identity = experiment.run_identity(sweep, run, args)
    record = experiment.Trainer(sweep, args).train(run, identity, "sweep")

    cfg = experiment.model_config(sweep, run.model, args)
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=identity["warmup_steps"], total_steps=5,
                            weight_decay=args.weight_decay)
    state = jax.jit(init_train_state, static_argnums=(0, 1))(cfg, train_cfg, jax.random.key(args.seed))
    step = jax.jit(train_step, static_argnames=("model_cfg", "train_cfg"))
    expected = []
    for index in range(5):
        windows = batch_at(data.train, index, batch_size=args.batch, seq_len=args.seq, seed=args.seed)
        state, metrics = step(state, windows_to_batch(windows), model_cfg=cfg, train_cfg=train_cfg)
        expected.append(float(metrics["loss"]))
    np.testing.assert_allclose(record["train_losses"], expected, rtol=2e-5)
    assert expected[0] != expected[4]  # it learns (or at least moves)
    # the validation loss: of the final parameters, token-weighted over the fixed windows (the shape's evaluation
    # program, already compiled, is eval_step)
    functions, compile_seconds = experiment.shape_functions(cfg, args, None)
    assert compile_seconds == 0.0  # compiled once per shape and process
    sums = [functions.evaluate(state.params, windows_to_batch(batch_at(data.validation, i, batch_size=args.batch,
                                                                       seq_len=args.seq, seed=args.seed)))
            for i in range(args.eval_batches)]
    val_loss = sum(float(s["nll_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)
    assert record["val_loss"] == pytest.approx(val_loss, rel=2e-5)
    assert record["tokens"] == 5 * 32 and record["flops"] == 6 * run.model.non_embedding_params * 160
    assert record["tokens_per_second"] > 0 and record["key"] == experiment.run_key(identity)


def test_quick_sweep_resumes_from_its_cache(tokens, tmp_path, capsys):
    """The whole command at toy size (one shape: the chunked test's compilation serves it), rerun, then a kill."""
    out = tmp_path / "sweep"
    argv = ["--quick", "--data", str(tokens), "--out", str(out), "--ladder", "1x16", "--sizes-per-budget", "1"]
    assert experiment.main(argv) == 0
    first = read_report(out)
    assert first["counts"] == {"planned": 2, "cached": 0, "trained": 2, "left": 0} and first["complete"]
    assert len(list((out / "runs").glob("*.json"))) == 2
    assert [r["steps"] for r in first["runs"]] == [4, 11]  # 2e6 and 6e6 FLOPs / (6 x 2,736 x 32 tokens)
    assert all(np.isfinite(r["val_loss"]) and r["tokens"] == r["steps"] * 32 for r in first["runs"])
    assert first["data"].startswith(str(tokens)) and first["runs"][0]["config"]["vocab"] == 257
    # one size a budget, two runs: each fit is one clear line, and the rest of the report is written
    assert "a parabola needs at least 3 model sizes, got 1" in first["fits"]["compute_optimal_error"]
    assert "needs at least 5 runs, got 2" in first["fits"]["loss_law_error"]
    assert (out / "isoflop.png").stat().st_size > 0 and (out / "predicted.png").stat().st_size > 0

    assert experiment.main(argv + ["--no-plots"]) == 0  # a rerun: everything from the cache
    second = read_report(out)
    assert second["counts"] == {"planned": 2, "cached": 2, "trained": 0, "left": 0}
    assert [r["val_loss"] for r in second["runs"]] == [r["val_loss"] for r in first["runs"]]

    killed = sorted((out / "runs").glob("*.json"))[0]  # as if killed before that run was written
    killed.unlink()
    (out / "runs" / "torn.json.tmp").write_text("{")  # a temporary file of the write the kill interrupted
    assert experiment.main(argv + ["--no-plots"]) == 0
    third = read_report(out)
    assert third["counts"] == {"planned": 2, "cached": 1, "trained": 1, "left": 0} and killed.is_file()
    assert [r["val_loss"] for r in third["runs"]] == [r["val_loss"] for r in first["runs"]]  # deterministic
    assert "2 sweep runs: 1 cached" in capsys.readouterr().out


def synthetic_record(sweep, run, args, loss: float) -> dict:
    """A cache record of this planned run, as training would have written it, with the given loss."""
    identity = experiment.run_identity(sweep, run, args)
    return {"key": experiment.run_key(identity), "non_embedding_params": run.model.non_embedding_params,
            "total_params": run.model.total_params, "steps": run.steps, "tokens": run.tokens, "flops": run.flops,
            "val_loss": loss, "final_train_loss": loss, "train_seconds": 0.001 * run.steps, "eval_seconds": 0.01,
            "compile_seconds": 1.0, "model": run.model.name, "config": identity}


def law_loss(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def test_fits_and_the_check_from_a_cache_of_synthetic_runs(tmp_path, capsys):
    out = tmp_path / "synthetic"
    flags = ["--quick", "--ladder", "1x8,2x8,1x16,2x16,3x16,4x16,4x24,6x24", "--budgets", "2e7,6e7,2e8",
             "--tokens-per-param", "1", "--sizes-per-budget", "5", "--min-steps", "1", "--out", str(out),
             "--predict-factor", "3", "--check"]
    args = experiment.parse_args(flags)
    sweep = experiment.make_sweep(args, experiment.open_sweep_data(args, 301))
    (out / "runs").mkdir(parents=True)
    for run in sweep.runs:  # the sweep as if trained, its losses from LAW
        record = synthetic_record(sweep, run, args, law_loss(run.model.non_embedding_params, run.tokens))
        (out / "runs" / f"{record['key']}.json").write_text(json.dumps(record))

    assert experiment.main(flags + ["--bootstrap", "0", "--time-budget-s", "0", "--no-plots"]) == 0  # no check yet
    report = read_report(out)
    planned = len(sweep.runs) + 1
    assert report["counts"] == {"planned": planned, "cached": planned - 1, "trained": 0, "left": 1}
    assert not report["complete"] and "actual_loss" not in report["check"]
    fits = report["fits"]
    for name, value in LAW.items():  # noise-free losses of the law itself
        assert fits["loss_law"][name] == pytest.approx(value, rel=2e-3), name
    assert fits["compute_optimal"]["n_law"]["exponent"] == pytest.approx(0.5, abs=0.05)
    assert fits["compute_optimal"]["d_law"]["exponent"] == pytest.approx(0.5, abs=0.05)
    assert len(fits["isoflop"]) == 3 and "intervals" not in fits  # --bootstrap 0
    prediction = fits["prediction"]
    assert prediction["budget"] == 6e8 and prediction["tokens"] * prediction["n_params"] * 6 == pytest.approx(6e8)
    assert "left to do: 1 run(s)" in capsys.readouterr().out

    check = report["check"]  # the ladder model nearest N*, for C / 6N tokens of the prediction's budget
    model = next(m for m in sweep.models if m.name == check["model"])
    assert model == scaling.nearest_model(sweep.models, prediction["n_params"])
    run = scaling.PlannedRun(6e8, model, check["steps"], args.batch * args.seq)
    assert check["tokens"] == run.tokens == pytest.approx(6e8 / (6 * model.non_embedding_params), abs=16)
    assert check["predicted_loss"] == pytest.approx(law_loss(model.non_embedding_params, run.tokens), rel=2e-3)
    record = synthetic_record(sweep, run, args, 1.01 * check["predicted_loss"])  # the check run, 1% worse
    (out / "runs" / f"{record['key']}.json").write_text(json.dumps(record))
    assert experiment.main(flags + ["--bootstrap", "8"]) == 0
    report = read_report(out)
    assert report["counts"] == {"planned": planned, "cached": planned, "trained": 0, "left": 0} and report["complete"]
    assert report["fits"]["bootstrap"]["samples"] >= 6
    low, high = report["fits"]["intervals"]["alpha"]
    assert low <= 0.5 + 1e-6 and high >= 0.5 - 1e-6
    check = report["check"]
    assert check["actual_loss"] == record["val_loss"] and check["within_2_percent"]
    assert check["relative_error"] == pytest.approx(-0.01 / 1.01, rel=1e-6)
    low, high = check["predicted_loss_interval"]
    assert low - 1e-6 <= check["predicted_loss"] <= high + 1e-6
    law = report["fits"]["compute_optimal"]["min_loss_law"]  # L*(C) through the IsoFLOP minima
    minima = {m["budget"]: m["min_loss"] for m in report["fits"]["isoflop"]}
    assert scaling.fit_power_law(list(minima), list(minima.values())).coefficient == pytest.approx(law["coefficient"])
    assert check["predicted_loss_isoflop"] == pytest.approx(law["coefficient"] * 6e8 ** law["exponent"], rel=1e-9)
    assert check["relative_error_isoflop"] == pytest.approx(
        (check["predicted_loss_isoflop"] - record["val_loss"]) / record["val_loss"], rel=1e-9)
    assert check["within_2_percent_isoflop"] == (abs(check["relative_error_isoflop"]) <= 0.02)
    assert len(check["predicted_loss_isoflop_interval"]) == 2
    assert [r["role"] for r in report["runs"]].count("check") == 1
    assert (out / "laws.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "prediction at 6e+08 FLOPs" in text and "by L(N, D) (-0.99%)" in text

    # --refit: the same fits and check from the report alone (no data, no cache), after the report's runs change
    (out / "runs").rename(out / "moved")
    report["runs"] = [r for r in report["runs"] if not (r["role"] == "sweep" and r["model"] == "1x8")]
    (out / "report.json").write_text(json.dumps(report))
    assert experiment.main(["--out", str(out), "--refit", "--bootstrap", "0", "--no-plots"]) == 0
    refitted = read_report(out)
    assert "refit_command" in refitted and refitted["check"]["actual_loss"] == check["actual_loss"]
    assert len(refitted["runs"]) == len(report["runs"]) and "intervals" not in refitted["fits"]
    assert refitted["check"]["predicted_loss"] == pytest.approx(check["predicted_loss"], rel=1e-2)
    assert "by L*(C)" in capsys.readouterr().out
    assert experiment.main(["--out", str(tmp_path / "nothing"), "--refit"]) == 2
    assert "--refit: no readable report" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "report.json").write_text(json.dumps({"runs": []}))
    assert experiment.main(["--out", str(tmp_path / "empty"), "--refit"]) == 2
    assert "records no sweep run yet" in capsys.readouterr().err


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


def test_the_default_gpu_plan_fits_one_epoch_of_the_byte_corpus():
    """The defaults (docs/scaling.md's GPU plan): every ladder shape is a valid model; 4 budgets of 6 sizes, each run
    >= 100 steps, the sizes on both sides of the D / N = 80 guess, within 60M tokens (the check's D too: the
    byte corpus of tools/issue26_scaling_gpu.sh has 157M)."""
    from llmjax.config import get_config

    models = scaling.build_ladder(get_config("llama-125m"), scaling.parse_ladder(experiment.DEFAULT_LADDER),
                                  head_dim=32, seq_len=256, vocab_size=257)
    heads = {m.name: scaling.ladder_config(get_config("llama-125m"), m.layers, m.width, head_dim=32, seq_len=256,
                                           vocab_size=257) for m in models}
    assert heads["6x224"].num_heads == 7 and heads["6x224"].num_kv_heads == 1  # 7 heads: one kv head, not 7 // 3
    assert heads["8x320"].num_kv_heads == 2  # 10 heads: 2 kv heads (10 // 3 = 3 does not divide them)
    budgets = [float(b) for b in experiment.DEFAULT_BUDGETS.split(",")]
    args = experiment.parse_args([])
    assert (args.batch, args.seq, args.min_steps, args.sizes_per_budget, args.tokens_per_param) == (16, 256, 100, 6, 80)
    runs = scaling.plan_isoflop_sweep(budgets, models, batch_tokens=16 * 256, sizes_per_budget=6, min_steps=100,
                                      max_tokens=50e6, tokens_per_param=80)
    assert len(runs) == 24 and min(r.steps for r in runs) >= 100 and max(r.tokens for r in runs) <= 50e6
    for budget in budgets:
        sizes = [r.model.non_embedding_params for r in runs if r.budget == budget]
        guess = scaling.compute_optimal_guess(budget, 80)
        assert min(sizes) < guess < max(sizes)
    check = scaling.nearest_model(models, scaling.compute_optimal_guess(10 * budgets[-1], 80))
    assert 10 * budgets[-1] / (6 * check.non_embedding_params) <= 60e6
    assert sum(r.steps for r in runs) < 80_000  # about 5 minutes at 4 ms a step
