"""llmjax.scaling: the fits recover known laws from synthetic noisy data (power law, IsoFLOP parabola, the Chinchilla
parametric law), bootstrap intervals contain the truth, planning (D = C / 6N, whole steps, infeasible budgets) and
the errors for too few points."""

import math
import re

import numpy as np
import pytest

from llmjax import scaling
from llmjax.scaling import LadderModel, Observation, ScalingError

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla's fitted law


def chinchilla_loss(n, d, **law):
    law = law or TRUE
    return law["E"] + law["A"] / np.asarray(n, float) ** law["alpha"] + law["B"] / np.asarray(d, float) ** law["beta"]


def optimal_n(budget, law=TRUE):
    """argmin over N of L(N, C / 6N): G (C / 6)^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha+beta))."""
    a, b = law["alpha"], law["beta"]
    return (a * law["A"] / (b * law["B"])) ** (1 / (a + b)) * (budget / 6) ** (b / (a + b))


def isoflop_observations(noise=0.0, seed=0, budgets=(1e18, 3e18, 1e19, 3e19, 1e20), sizes=7):
    """Runs at each budget, sizes spread x1/4 .. x4 around the true optimum, losses times exp(noise * normal)."""
    rng = np.random.default_rng(seed)
    runs = []
    for budget in budgets:
        for n in optimal_n(budget) * np.geomspace(0.25, 4, sizes):
            d = budget / (6 * n)
            runs.append(Observation(budget, n, d, float(chinchilla_loss(n, d) * math.exp(noise * rng.normal()))))
    return runs


def test_power_law_recovers_known_parameters_from_noisy_data():
    rng = np.random.default_rng(1)
    x = np.geomspace(1e17, 1e21, 8)
    exact = scaling.fit_power_law(x, 0.12 * x ** 0.5)
    assert exact.exponent == pytest.approx(0.5, abs=1e-12) and exact.coefficient == pytest.approx(0.12, rel=1e-9)
    noisy = scaling.fit_power_law(x, 0.12 * x ** 0.5 * np.exp(0.02 * rng.normal(size=x.size)))
    # the slope's standard error is 0.02 / (std(ln x) sqrt(8)) = 0.0021: allow five of them
    assert noisy.exponent == pytest.approx(0.5, abs=0.011)
    assert noisy.coefficient == pytest.approx(0.12, rel=0.5)  # e^(20 ln-units x 0.011): a loose coefficient
    np.testing.assert_allclose(noisy(1e19), 0.12 * 1e19 ** 0.5, rtol=0.03)


def test_parabola_minimum_of_a_known_curve():
    n = np.geomspace(1e5, 1e7, 6) * 1.7  # not centred on the minimum
    losses = 2.1 + 0.3 * (np.log(n) - math.log(8e5)) ** 2
    parabola = scaling.fit_parabola(n, losses)
    assert parabola.n_star == pytest.approx(8e5, rel=1e-9)
    assert parabola.min_loss == pytest.approx(2.1, abs=1e-12) and parabola.curvature == pytest.approx(0.3, rel=1e-9)
    np.testing.assert_allclose(parabola(n), losses, atol=1e-12)
    assert not parabola.extrapolated
    assert scaling.fit_parabola(n[3:], losses[3:]).extrapolated  # the minimum below the sizes trained


def test_parametric_objective_gradient_matches_finite_differences():
    runs = isoflop_observations(noise=0.01)
    log_n, log_d = np.log([r.n_params for r in runs]), np.log([r.tokens for r in runs])
    log_loss = np.log([r.loss for r in runs])
    theta = np.array([6.0, 6.1, 0.5, 0.3, 0.3])
    value, gradient = scaling._objective_and_gradient(theta, log_n, log_d, log_loss, 1e-3)
    assert value == pytest.approx(float(scaling.parametric_objective(theta, log_n, log_d, log_loss, 1e-3)), rel=1e-12)
    step = 1e-7
    numeric = [(scaling.parametric_objective(theta + step * e, log_n, log_d, log_loss, 1e-3)
                - scaling.parametric_objective(theta - step * e, log_n, log_d, log_loss, 1e-3)) / (2 * step)
               for e in np.eye(5)]
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8)
    # a grid of thetas gives each row's objective
    grid = np.stack([theta, theta + 0.1])
    np.testing.assert_allclose(scaling.parametric_objective(grid, log_n, log_d, log_loss, 1e-3),
                               [scaling.parametric_objective(t, log_n, log_d, log_loss, 1e-3) for t in grid])


def test_huber_is_quadratic_then_linear():
    r = np.array([-0.01, -1e-3, 0.0, 5e-4, 0.02])
    expected = [1e-3 * (0.01 - 5e-4), 0.5e-6, 0.0, 0.5 * 25e-8, 1e-3 * (0.02 - 5e-4)]
    np.testing.assert_allclose(scaling.huber(r, 1e-3), expected, rtol=1e-12)


def test_parametric_fit_recovers_the_law_on_a_grid_of_runs():
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6))
    exact = scaling.fit_parametric_law(n.ravel(), d.ravel(), chinchilla_loss(n, d).ravel())
    for name, value in TRUE.items():
        assert getattr(exact, name) == pytest.approx(value, rel=1e-3), name
    rng = np.random.default_rng(2)
    noisy_losses = chinchilla_loss(n, d).ravel() * np.exp(0.002 * rng.normal(size=n.size))
    noisy = scaling.fit_parametric_law(n.ravel(), d.ravel(), noisy_losses)
    assert noisy.E == pytest.approx(TRUE["E"], rel=0.03)
    assert noisy.alpha == pytest.approx(TRUE["alpha"], abs=0.04) and noisy.beta == pytest.approx(TRUE["beta"], abs=0.04)
    # the fitted law reproduces the losses within the noise (0.2%)
    np.testing.assert_allclose(noisy(n.ravel(), d.ravel()), chinchilla_loss(n, d).ravel(), rtol=4e-3)


def test_compute_optimal_fit_recovers_the_exponents_of_the_law():
    """IsoFLOP parabolas on losses from the law: N* ~ C^(beta / (alpha + beta)), D* ~ C^(alpha / (alpha + beta))."""
    optimal = scaling.fit_compute_optimal(isoflop_observations(noise=0.002))
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert optimal.n_law.exponent == pytest.approx(a_true, abs=0.03)
    assert optimal.d_law.exponent == pytest.approx(1 - a_true, abs=0.03)
    assert optimal.n_star(1e21) == pytest.approx(optimal_n(1e21), rel=0.25)
    assert optimal.d_star(1e21) * optimal.n_star(1e21) * 6 == pytest.approx(1e21, rel=1e-9)  # C = 6 N* D*
    assert len(optimal.parabolas) == 5
    # L*(C): each parabola's minimum is the law's minimum at its budget; the power law through them is the one
    # through the law's own minima (a power law only near them: L* has the offset E)
    budgets = list(optimal.parabolas)
    true_min = [float(chinchilla_loss(optimal_n(c), c / (6 * optimal_n(c)))) for c in budgets]
    np.testing.assert_allclose([optimal.parabolas[c].min_loss for c in budgets], true_min, rtol=3e-3)
    reference = scaling.fit_power_law(budgets, true_min)
    assert optimal.loss_law.exponent == pytest.approx(reference.exponent, rel=0.05) and reference.exponent < 0
    np.testing.assert_allclose([optimal.min_loss(c) for c in budgets], reference(budgets), rtol=3e-3)


def test_bootstrap_intervals_contain_the_true_values():
    runs = isoflop_observations(noise=0.004, seed=3)
    law = scaling.fit_loss_law(runs)

    def estimate(resample):
        fit = scaling.fit_scaling(resample, starts=2, initial=[law.as_theta()])
        return scaling.fit_numbers(fit, predict_budget=1e21, check_point=(1e8, 2e9))

    result = scaling.bootstrap(runs, estimate, samples=30, seed=0)
    assert result.samples + result.failures == 30 and result.samples >= 27
    truth = {"E": TRUE["E"], "alpha": TRUE["alpha"], "beta": TRUE["beta"],
             "n_law.exponent": TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]),
             "check.loss": float(chinchilla_loss(1e8, 2e9))}
    for name, value in truth.items():
        low, high = result.intervals[name]
        assert low <= value <= high, (name, low, value, high)
        assert high - low < abs(value), name  # an interval, not everything
    assert set(result.intervals) >= {"A", "B", "prediction.loss", "prediction.n_params", "d_law.coefficient"}


def test_resampling_keeps_each_budgets_run_count():
    runs = isoflop_observations(budgets=(1e18, 1e19), sizes=4)
    rng = np.random.default_rng(0)
    for _ in range(50):
        resample = scaling.resample_within_budgets(runs, rng)
        assert [r.budget for r in resample].count(1e18) == 4 and len(resample) == 8
        assert set(resample) <= set(runs)
        for budget in (1e18, 1e19):  # redrawn until a parabola can be fitted: 3 distinct sizes
            assert len({r.n_params for r in resample if r.budget == budget}) >= 3


def ladder(*sizes):
    return [LadderModel(1, 8 * (i + 1), n, n + 1000) for i, n in enumerate(sizes)]


def test_steps_and_tokens_follow_d_equals_c_over_6n():
    assert scaling.tokens_for(6e12, 1e6) == pytest.approx(1e6)
    assert scaling.steps_for(6 * 1e6 * 1000 * 10.5, 1e6, 1000) == 11  # halves round up
    assert scaling.steps_for(6 * 1e6 * 1000 * 10.49, 1e6, 1000) == 10
    models = ladder(1e4, 2e4, 4e4, 8e4, 1.6e5, 3.2e5)
    runs = scaling.plan_isoflop_sweep([1e12, 4e12], models, batch_tokens=512, sizes_per_budget=3,
                                      tokens_per_param=20, min_steps=10)
    assert [r.budget for r in runs] == [1e12] * 3 + [4e12] * 3
    for run in runs:
        target = run.budget / (6 * run.model.non_embedding_params)
        assert abs(run.tokens - target) <= 256 and run.tokens == run.steps * 512
        assert run.flops == pytest.approx(run.budget, rel=256 / target)
    # the sizes nearest (in ln N) the guess sqrt(C / 120): 9.1e4 at 1e12, 1.8e5 at 4e12
    assert [r.model.non_embedding_params for r in runs[:3]] == [4e4, 8e4, 1.6e5]
    assert [r.model.non_embedding_params for r in runs[3:]] == [8e4, 1.6e5, 3.2e5]
    assert scaling.compute_optimal_guess(1.2e14, 20) == pytest.approx(1e6)


def test_a_budget_that_allows_no_model_names_the_smallest_feasible_budget():
    models = ladder(1e4, 2e4, 4e4)
    smallest = 6 * 1e4 * 512 * 50  # the smallest model for min_steps steps
    with pytest.raises(ScalingError, match=re.escape(f"smallest feasible budget is {smallest:.3g} FLOPs")):
        scaling.plan_isoflop_sweep([1e9, 1e12], models, batch_tokens=512, sizes_per_budget=3, min_steps=50)
    largest = 6 * 4e4 * 1_000_000
    pattern = r"budget 1e\+16 FLOPs allows no model.*the largest " + re.escape(f"{largest:.3g}")
    with pytest.raises(ScalingError, match=pattern):
        scaling.plan_isoflop_sweep([1e16], models, batch_tokens=500, sizes_per_budget=3, min_steps=1,
                                   max_tokens=1_000_000)
    with pytest.raises(ScalingError, match="no budget is feasible"):
        scaling.plan_isoflop_sweep([1e12], models, batch_tokens=512, sizes_per_budget=3, min_steps=10,
                                   max_tokens=1000)
    assert scaling.feasible_budget_range(models, 512, 50, math.inf) == (smallest, math.inf)


def test_too_few_points_are_clear_errors():
    with pytest.raises(ScalingError, match="at least 3 model sizes, got 2"):
        scaling.fit_parabola([1e5, 2e5, 2e5], [3.0, 2.9, 2.95])
    with pytest.raises(ScalingError, match="opens downwards"):
        scaling.fit_parabola([1e5, 2e5, 4e5], [2.0, 3.0, 2.0])
    with pytest.raises(ScalingError, match="at least 2 budgets, got 1"):
        scaling.fit_power_law([1e18, 1e18], [1e6, 2e6])
    with pytest.raises(ScalingError, match="needs at least 5 runs, got 4"):
        scaling.fit_parametric_law([1, 2, 3, 4], [1, 2, 3, 4], [3.0, 2.9, 2.8, 2.7])
    runs = isoflop_observations(budgets=(1e18, 1e19), sizes=5)
    with pytest.raises(ScalingError, match="budget 1e\\+19 FLOPs: a parabola needs at least 3"):
        scaling.fit_compute_optimal(runs[:7])
    with pytest.raises(ScalingError, match="at least 2 budgets"):
        scaling.fit_compute_optimal(runs[:5])


def test_ladder_counts_non_embedding_parameters_like_the_model_specs():
    import jax

    from llmjax.config import count_params, get_config
    from llmjax.model.transformer import model_spec

    preset = get_config("llama-125m")
    models = scaling.build_ladder(preset, scaling.parse_ladder("2x64,1x64,3x96"), head_dim=32, seq_len=256,
                                  vocab_size=257)
    assert [m.name for m in models] == ["1x64", "2x64", "3x96"]
    for model in models:
        cfg = scaling.ladder_config(preset, model.layers, model.width, head_dim=32, seq_len=256, vocab_size=257)
        spec = model_spec(cfg)
        blocks_and_final_norm = {k: spec[k] for k in ("blocks", "final_norm")}
        sizes = jax.tree.leaves(jax.tree.map(lambda s: math.prod(s.shape), blocks_and_final_norm,
                                             is_leaf=lambda s: hasattr(s, "shape")))
        assert model.non_embedding_params == sum(sizes)
        assert model.total_params == count_params(cfg) == model.non_embedding_params + 2 * 257 * model.width
        assert cfg.num_heads * 32 == model.width and cfg.head_dim == 32 and not cfg.tie_embeddings
    with pytest.raises(ValueError, match="ladder entry '3y96'"):
        scaling.parse_ladder("2x64,3y96")
