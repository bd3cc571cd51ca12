"""Learning-rate schedules against float64 closed forms written here (exact rationals where the form is linear)."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import TrainConfig
from llmjax.train.optim import learning_rate_schedule
from llmjax.train.schedules import (
    constant_schedule,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    wsd_schedule,
)


def warmup_or_floor(step, max_lr, min_lr, warmup, total):
    """The shared pieces: (True, lr) inside warmup or from `total` on, else (False, None)."""
    if step < warmup:
        return True, float(Fraction(max_lr) * step / warmup)
    if step >= total:
        return True, min_lr
    return False, None


def cosine_reference(step, max_lr, min_lr, warmup, total):
    done, lr = warmup_or_floor(step, max_lr, min_lr, warmup, total)
    if done:
        return lr
    progress = (step - warmup) / (total - warmup)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_reference(step, max_lr, min_lr, warmup, total):
    done, lr = warmup_or_floor(step, max_lr, min_lr, warmup, total)
    if done:
        return lr
    fraction_left = Fraction(total - step, total - warmup)
    return float(Fraction(min_lr) + (Fraction(max_lr) - Fraction(min_lr)) * fraction_left)


def wsd_reference(step, max_lr, min_lr, warmup, total, decay_fraction):
    done, lr = warmup_or_floor(step, max_lr, min_lr, warmup, total)
    if done:
        return lr
    decay_steps = Fraction(decay_fraction) * (total - warmup)
    if total - step >= decay_steps:
        return max_lr
    return float(Fraction(min_lr) + (Fraction(max_lr) - Fraction(min_lr)) * (total - step) / decay_steps)


def constant_reference(step, max_lr, warmup):
    return float(Fraction(max_lr) * step / warmup) if step < warmup else max_lr


def random_setting(seed):
    """Awkward hyperparameters: lr over four decades, the floor zero or a random share, odd step counts."""
    rng = np.random.default_rng(seed)
    max_lr = float(10 ** rng.uniform(-5, -1))
    min_lr = 0.0 if seed % 3 == 0 else float(max_lr * rng.uniform(0, 1))
    warmup = [0, int(rng.integers(1, 40))][seed % 2]
    total = warmup + [0, 1, int(rng.integers(2, 500))][seed % 3]
    decay_fraction = float(rng.choice([1.0, rng.uniform(0.01, 1)]))
    return max_lr, min_lr, warmup, total, decay_fraction


def probe_steps(warmup, total, seed):
    """Every boundary (0, warmup +- 1, total +- 1, far beyond) and a few random steps between."""
    rng = np.random.default_rng(seed + 100)
    middle = rng.integers(0, total + 1, 6) if total > 0 else []
    steps = {0, 1, warmup - 1, warmup, warmup + 1, total - 1, total, total + 1, total + 10_000, *map(int, middle)}
    return sorted(step for step in steps if step >= 0)


def assert_equal_or_within_1e15(got, want, what):
    got = float(got)
    assert got == want or abs(got - want) <= 1e-15 * abs(want), f"{what}: {got!r} != {want!r}"


SCHEDULE_CASES = [
    ("cosine", cosine_schedule, cosine_reference),
    ("linear", linear_schedule, linear_reference),
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name,schedule,reference", SCHEDULE_CASES)
def test_decaying_schedules_equal_their_closed_forms(name, schedule, reference, seed):
    max_lr, min_lr, warmup, total, _ = random_setting(seed)
    steps = probe_steps(warmup, total, seed)
    with jax.enable_x64(True):
        traced = jax.jit(lambda step: schedule(step, max_lr, min_lr, warmup, total))(jnp.asarray(steps, jnp.int32))
        assert traced.dtype == jnp.float64
        for index, step in enumerate(steps):
            want = reference(step, max_lr, min_lr, warmup, total)
            assert_equal_or_within_1e15(schedule(step, max_lr, min_lr, warmup, total), want, f"{name} step {step}")
            assert_equal_or_within_1e15(traced[index], want, f"jitted {name} step {step}")


@pytest.mark.parametrize("seed", range(6))
def test_wsd_and_constant_equal_their_closed_forms(seed):
    max_lr, min_lr, warmup, total, decay_fraction = random_setting(seed)
    steps = probe_steps(warmup, total, seed)
    decay_start = total - decay_fraction * (total - warmup)
    steps = sorted({*steps, *(s for s in (math.floor(decay_start), math.ceil(decay_start)) if s >= 0)})
    with jax.enable_x64(True):
        wsd = jax.jit(lambda step: wsd_schedule(step, max_lr, min_lr, warmup, total, decay_fraction))
        constant = jax.jit(lambda step: constant_schedule(step, max_lr, warmup))
        wsd_traced, constant_traced = wsd(jnp.asarray(steps)), constant(jnp.asarray(steps))
        for index, step in enumerate(steps):
            want = wsd_reference(step, max_lr, min_lr, warmup, total, decay_fraction)
            assert_equal_or_within_1e15(wsd_schedule(step, max_lr, min_lr, warmup, total, decay_fraction), want,
                                        f"wsd step {step}")
            assert_equal_or_within_1e15(wsd_traced[index], want, f"jitted wsd step {step}")
            want = constant_reference(step, max_lr, warmup)
            assert_equal_or_within_1e15(constant_schedule(step, max_lr, warmup), want, f"constant step {step}")
            assert_equal_or_within_1e15(constant_traced[index], want, f"jitted constant step {step}")


def test_boundaries_are_exact():
    """Step 0 is 0, the end of warmup is max_lr, `total` and beyond are min_lr; without warmup, step 0 is max_lr."""
    with jax.enable_x64(True):
        for schedule in (cosine_schedule, linear_schedule):
            assert float(schedule(0, 3e-4, 3e-5, 10, 110)) == 0.0
            assert float(schedule(10, 3e-4, 3e-5, 10, 110)) == pytest.approx(3e-4, rel=1e-15)
            assert float(schedule(110, 3e-4, 3e-5, 10, 110)) == 3e-5
            assert float(schedule(10**9, 3e-4, 3e-5, 10, 110)) == 3e-5
            assert float(schedule(0, 3e-4, 3e-5, 0, 110)) == pytest.approx(3e-4, rel=1e-15)
            # warmup == total: no decay phase, the floor from `total` on
            assert float(schedule(7, 3e-4, 3e-5, 8, 8)) == pytest.approx(3e-4 * 7 / 8, rel=1e-15)
            assert float(schedule(8, 3e-4, 3e-5, 8, 8)) == 3e-5
            assert float(schedule(0, 3e-4, 3e-5, 0, 0)) == 3e-5
        assert float(wsd_schedule(79, 2e-3, 0.0, 0, 100, 0.2)) == 2e-3
        assert float(wsd_schedule(90, 2e-3, 0.0, 0, 100, 0.2)) == pytest.approx(1e-3, rel=1e-15)
        assert float(constant_schedule(10**9, 2e-3, 5)) == 2e-3


def test_float32_without_x64():
    lr = cosine_schedule(jnp.int32(37), 1e-3, 1e-4, 10, 110)
    assert lr.dtype == jnp.float32
    assert float(lr) == pytest.approx(cosine_reference(37, 1e-3, 1e-4, 10, 110), rel=1e-6)


def test_vector_of_steps_keeps_its_shape():
    steps = np.arange(12).reshape(3, 4)
    lr = linear_schedule(steps, 1.0, 0.0, 2, 10)
    assert lr.shape == (3, 4)
    np.testing.assert_allclose(lr, [[linear_reference(int(s), 1.0, 0.0, 2, 10) for s in row] for row in steps],
                               rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_train_config_schedule_is_built_from_the_functions(kind, seed):
    max_lr, min_lr, warmup, total, decay_fraction = random_setting(seed)
    total = max(total, 1)
    cfg = TrainConfig(lr=max_lr, min_lr_ratio=min_lr / max_lr, warmup_steps=warmup, total_steps=total,
                      schedule=kind, decay_fraction=decay_fraction)
    floor = cfg.lr * cfg.min_lr_ratio
    with jax.enable_x64(True):
        from_config = learning_rate_schedule(cfg)
        for step in probe_steps(warmup, total, seed):
            want = {
                "cosine": lambda s: cosine_reference(s, max_lr, floor, warmup, total),
                "linear": lambda s: linear_reference(s, max_lr, floor, warmup, total),
                "wsd": lambda s: wsd_reference(s, max_lr, floor, warmup, total, decay_fraction),
                "constant": lambda s: constant_reference(s, max_lr, warmup),
            }[kind](step)
            assert_equal_or_within_1e15(from_config(step), want, f"{kind} step {step}")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: cosine_schedule(0, 1e-3, 1e-4, 20, 10), r"cosine_schedule: warmup=20 exceeds total=10"),
        (lambda: linear_schedule(0, 1e-3, 1e-4, -1, 10), r"linear_schedule: warmup=-1 must be >= 0"),
        (lambda: linear_schedule(0, 1e-3, 1e-4, 0, -5), r"linear_schedule: total=-5 must be >= 0"),
        (lambda: cosine_schedule(0, 1e-4, 1e-3, 0, 10), r"min_lr=0.001 exceeds max_lr=0.0001"),
        (lambda: cosine_schedule(-3, 1e-3, 1e-4, 0, 10), r"step=-3 must be >= 0"),
        (lambda: cosine_schedule(0, float("nan"), 0.0, 0, 10), r"max_lr=nan must be >= 0"),
        (lambda: wsd_schedule(0, 1e-3, 0.0, 0, 10, 0.0), r"wsd_schedule: decay_fraction=0.0 must be within \(0, 1\]"),
        (lambda: wsd_schedule(0, 1e-3, 0.0, 0, 10, 1.5), r"decay_fraction=1.5 must be within \(0, 1\]"),
        (lambda: constant_schedule(0, 1e-3, -2), r"constant_schedule: warmup=-2 must be >= 0"),
        (lambda: make_schedule("cosine", max_lr=1e-3, min_lr=0.0, warmup=20, total=10), r"warmup=20 exceeds total=10"),
        (lambda: make_schedule("wsd", max_lr=1e-3, total=10, decay_fraction=2.0), r"decay_fraction=2.0"),
        (lambda: make_schedule("step", max_lr=1e-3, total=10), r"name='step'"),
        (lambda: make_schedule("linear", max_lr=1e-3), r"total is required"),
    ],
)
def test_bad_arguments_raise_one_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_make_schedule_is_a_checked_closure():
    schedule = make_schedule("wsd", max_lr=1e-3, min_lr=1e-5, warmup=3, total=40, decay_fraction=0.25)
    with jax.enable_x64(True):
        for step in (0, 2, 3, 20, 31, 35, 40, 41):
            assert float(schedule(step)) == float(wsd_schedule(step, 1e-3, 1e-5, 3, 40, 0.25))
