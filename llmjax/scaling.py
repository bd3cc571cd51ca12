"""Scaling laws: IsoFLOP sweep planning, the Chinchilla fits and their bootstrap intervals (NumPy and SciPy only).

Sizes and compute follow Kaplan et al. (2020): N is the count of *non-embedding* parameters (every block weight and
norm, the final norm; not the token embedding, the output head or learned positions), and a run of N parameters
trained on D tokens costs C = 6 N D FLOPs. A sweep has several compute budgets C; at each, several models of a
ladder of (layers, width) shapes, each trained for D = C / (6 N) tokens.

Two fits, as Hoffmann et al. (2022, "Chinchilla") do:
  (a) approach 2, IsoFLOP minima: per budget a parabola of the loss in ln N; its vertex is N*(C), and D*(C) =
      C / (6 N*(C)); then power laws N*(C) = k_N C^a and D*(C) = k_D C^b by least squares in log space;
  (b) approach 3, the parametric loss L(N, D) = E + A / N^alpha + B / D^beta: the Huber loss (delta 1e-3) of
      ln L_predicted - ln L_observed, with L_predicted = LSE(a - alpha ln N, b - beta ln D, e) (a = ln A, b = ln B,
      e = ln E), minimized by L-BFGS from the best points of a grid of initialisations.
Intervals are bootstrap percentiles: resample the runs with replacement (within each budget), refit everything.

experiments/scaling.py trains the runs; this module never imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FLOPS_PER_PARAMETER_TOKEN = 6  # forward 2 + backward 4 multiply-adds' FLOPs per parameter and token
MIN_SIZES_PER_PARABOLA = 3
MIN_BUDGETS_PER_POWER_LAW = 2
MIN_RUNS_PER_PARAMETRIC_FIT = 5
HUBER_DELTA = 1e-3
# Chinchilla's grid of initialisations (approach 3): alpha, beta, e = ln E, a = ln A, b = ln B.
INITIAL_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
                "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)}
EXPONENT_BOUNDS = (0.0, 4.0)  # alpha and beta stay in here (a negative exponent would mean bigger is worse)


class ScalingError(ValueError):
    """A sweep that cannot be planned or a fit that cannot be made: the message names the problem and the fix."""


# --- the model ladder -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LadderModel:
    """One shape of the model family: its size in parameters (non-embedding N, and in all)."""

    layers: int
    width: int
    non_embedding_params: int
    total_params: int

    @property
    def name(self) -> str:
        return f"{self.layers}x{self.width}"


def parse_ladder(text: str) -> list[tuple[int, int]]:
    """"2x64,3x96" -> [(2, 64), (3, 96)]: (layers, width) pairs; ValueError naming the bad entry."""
    shapes = []
    for entry in (item.strip() for item in text.split(",")):
        layers, _, width = entry.lower().partition("x")
        if not (layers.isdigit() and width.isdigit()) or int(layers) < 1 or int(width) < 1:
            raise ValueError(f"ladder entry {entry!r}: expected LAYERSxWIDTH with positive integers, e.g. 4x128")
        shapes.append((int(layers), int(width)))
    return shapes


def embedding_params(cfg) -> int:
    """Parameters of the vocabulary and position tables: the token (and type) embedding, the untied output head,
    learned positions: what Kaplan's N leaves out."""
    tables = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.positions == "learned":
        tables += cfg.max_seq_len * cfg.d_model
    return tables + cfg.type_vocab_size * cfg.d_model


def non_embedding_params(cfg) -> int:
    """Kaplan's N: every parameter but the embedding tables (llmjax.config.count_params less embedding_params)."""
    from llmjax.config import count_params

    return count_params(cfg) - embedding_params(cfg)


def ladder_config(preset, layers: int, width: int, *, head_dim: int, seq_len: int, vocab_size: int):
    """The preset's family (norms, activation, positions, kv-head ratio, d_ff / d_model) at this depth and width:
    heads of head_dim, d_ff rounded to a multiple of 8, an untied head, the given vocabulary."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head dimension {head_dim}")
    heads = width // head_dim
    kv_ratio = max(1, preset.num_heads // preset.num_kv_heads)
    # the most kv heads up to heads / ratio that divide the heads (7 heads at ratio 3: 1)
    kv_heads = max(k for k in range(1, max(1, heads // kv_ratio) + 1) if heads % k == 0)
    d_ff = max(8, int(round(width * preset.d_ff / preset.d_model / 8)) * 8)
    return dataclasses.replace(preset, d_model=width, num_layers=layers, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=head_dim, d_ff=d_ff,
                               max_seq_len=max(seq_len, 8), vocab_size=vocab_size, tie_embeddings=False)


def build_ladder(preset, shapes: Sequence[tuple[int, int]], *, head_dim: int, seq_len: int,
                 vocab_size: int) -> list[LadderModel]:
    """LadderModels of the given (layers, width) shapes, smallest N first."""
    from llmjax.config import count_params

    models = []
    for layers, width in shapes:
        cfg = ladder_config(preset, layers, width, head_dim=head_dim, seq_len=seq_len, vocab_size=vocab_size)
        models.append(LadderModel(layers, width, non_embedding_params(cfg), count_params(cfg)))
    return sorted(models, key=lambda m: (m.non_embedding_params, m.layers))


# --- planning ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: a model trained for `steps` steps of batch_tokens tokens at (about) `budget` FLOPs."""

    budget: float  # the nominal compute budget C this run belongs to
    model: LadderModel
    steps: int
    batch_tokens: int

    @property
    def tokens(self) -> int:  # D as trained: whole steps
        return self.steps * self.batch_tokens

    @property
    def flops(self) -> float:  # C as trained: 6 N D
        return FLOPS_PER_PARAMETER_TOKEN * self.model.non_embedding_params * self.tokens


def tokens_for(budget: float, n_params: float) -> float:
    """D = C / (6 N)."""
    return budget / (FLOPS_PER_PARAMETER_TOKEN * n_params)


def steps_for(budget: float, n_params: float, batch_tokens: int) -> int:
    """Whole optimizer steps nearest to D = C / (6 N) tokens (halves round up)."""
    return int(math.floor(tokens_for(budget, n_params) / batch_tokens + 0.5))


def compute_optimal_guess(budget: float, tokens_per_param: float) -> float:
    """N with D = tokens_per_param * N at C = 6 N D: sqrt(C / (6 * tokens_per_param)) (the sweep's centre)."""
    return math.sqrt(budget / (FLOPS_PER_PARAMETER_TOKEN * tokens_per_param))


def feasible_budget_range(models: Sequence[LadderModel], batch_tokens: int, min_steps: int,
                          max_tokens: float) -> tuple[float, float] | None:
    """(smallest, largest) budget at which some model trains >= min_steps steps on <= max_tokens tokens; None when
    no budget is (min_steps steps of batch_tokens exceed max_tokens)."""
    max_steps = math.inf if math.isinf(max_tokens) else math.floor(max_tokens / batch_tokens)
    if max_steps < min_steps or not models:
        return None
    n = [m.non_embedding_params for m in models]
    return (FLOPS_PER_PARAMETER_TOKEN * min(n) * batch_tokens * min_steps,
            FLOPS_PER_PARAMETER_TOKEN * max(n) * batch_tokens * max_steps)


def plan_isoflop_sweep(budgets: Sequence[float], models: Sequence[LadderModel], *, batch_tokens: int,
                       sizes_per_budget: int, tokens_per_param: float = 20.0, min_steps: int = 1,
                       max_tokens: float = math.inf) -> list[PlannedRun]:
    """For each budget, the sizes_per_budget ladder models nearest (in ln N) to the compute-optimal guess among those
    that train at least min_steps steps on at most max_tokens tokens; runs by budget, then N.

    A budget that allows no model raises ScalingError naming the smallest (and largest) feasible budget.
    """
    if not models:
        raise ScalingError("the model ladder is empty: give at least one LAYERSxWIDTH shape")
    if sizes_per_budget < 1:
        raise ScalingError(f"sizes_per_budget={sizes_per_budget}: must be at least 1")
    feasible_range = feasible_budget_range(models, batch_tokens, min_steps, max_tokens)
    if feasible_range is None:
        raise ScalingError(f"no budget is feasible: {min_steps} steps of {batch_tokens:,} tokens exceed the "
                           f"{max_tokens:,.0f} tokens allowed; lower the minimum steps or the batch, or add data")
    runs = []
    for budget in sorted(budgets):
        if not budget > 0:
            raise ScalingError(f"budget {budget!r}: compute budgets must be positive FLOPs")
        candidates = []
        for model in models:
            run = PlannedRun(float(budget), model, steps_for(budget, model.non_embedding_params, batch_tokens),
                             batch_tokens)
            if run.steps >= min_steps and run.tokens <= max_tokens:
                candidates.append(run)
        if not candidates:
            smallest, largest = feasible_range
            raise ScalingError(
                f"budget {budget:.3g} FLOPs allows no model of the ladder ({models[0].name} .. {models[-1].name}: "
                f"N {models[0].non_embedding_params:,} .. {models[-1].non_embedding_params:,}) with at least "
                f"{min_steps} steps of {batch_tokens:,} tokens and at most {max_tokens:,.0f} tokens: the smallest "
                f"feasible budget is {smallest:.3g} FLOPs (the largest {largest:.3g})")
        centre = math.log(compute_optimal_guess(budget, tokens_per_param))
        nearest = sorted(candidates, key=lambda r: abs(math.log(r.model.non_embedding_params) - centre))
        runs.extend(sorted(nearest[:sizes_per_budget], key=lambda r: r.model.non_embedding_params))
    return runs


def nearest_model(models: Sequence[LadderModel], n_params: float) -> LadderModel:
    """The ladder model whose N is nearest to n_params in ln N."""
    return min(models, key=lambda m: abs(math.log(m.non_embedding_params / n_params)))


# --- observations and the IsoFLOP fits (approach 2) ---------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One finished run: its budget (nominal C), non-embedding parameters N, tokens D trained, final loss."""

    budget: float
    n_params: float
    tokens: float
    loss: float


@dataclass(frozen=True)
class Parabola:
    """loss = min_loss + curvature * (ln N - ln n_star)^2, fitted by least squares on one budget's runs."""

    curvature: float
    n_star: float
    min_loss: float
    smallest_n: float  # the sizes it was fitted on
    largest_n: float

    def __call__(self, n_params):
        return self.min_loss + self.curvature * (np.log(n_params) - math.log(self.n_star)) ** 2

    @property
    def extrapolated(self) -> bool:
        """The minimum lies outside the sizes trained: the sweep should be moved towards it."""
        return not self.smallest_n <= self.n_star <= self.largest_n


def fit_parabola(n_params: Sequence[float], losses: Sequence[float]) -> Parabola:
    """The least-squares parabola of loss in ln N and its vertex; ScalingError with fewer than 3 sizes or no minimum."""
    x, y = np.log(np.asarray(n_params, np.float64)), np.asarray(losses, np.float64)
    if len(np.unique(x)) < MIN_SIZES_PER_PARABOLA:
        raise ScalingError(f"a parabola needs at least {MIN_SIZES_PER_PARABOLA} model sizes, got "
                           f"{len(np.unique(x))}; add sizes to the budget")
    centre = x.mean()  # fit in x - centre: better conditioned
    design = np.stack([(x - centre) ** 2, x - centre, np.ones_like(x)], axis=1)  # [runs, 3]
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    if not a > 0:
        raise ScalingError(f"the losses have no minimum in ln N (the fitted parabola opens downwards, curvature "
                           f"{a:.3g}): the sizes lie on one side of the optimum; widen the sizes around it")
    x_star = centre - b / (2 * a)
    return Parabola(float(a), float(math.exp(x_star)), float(c - b * b / (4 * a)), float(np.exp(x.min())),
                    float(np.exp(x.max())))


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x^exponent."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        return self.coefficient * np.asarray(x, np.float64) ** self.exponent


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least squares of ln y = ln k + exponent ln x; ScalingError with fewer than 2 distinct x."""
    log_x, log_y = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if len(np.unique(log_x)) < MIN_BUDGETS_PER_POWER_LAW:
        raise ScalingError(f"a power law needs at least {MIN_BUDGETS_PER_POWER_LAW} budgets, got "
                           f"{len(np.unique(log_x))}; add budgets")
    exponent, log_k = np.polyfit(log_x, log_y, 1)
    return PowerLaw(float(math.exp(log_k)), float(exponent))


def by_budget(observations: Sequence[Observation]) -> dict[float, list[Observation]]:
    groups: dict[float, list[Observation]] = {}
    for obs in observations:
        groups.setdefault(obs.budget, []).append(obs)
    return dict(sorted(groups.items()))


@dataclass(frozen=True)
class ComputeOptimal:
    """Approach 2: the parabola of each budget, and the power laws through their minima."""

    parabolas: dict  # {budget: Parabola}
    n_law: PowerLaw  # N*(C)
    d_law: PowerLaw  # D*(C) = C / (6 N*(C)) at the fitted budgets
    loss_law: PowerLaw  # L*(C): the parabolas' minimum losses (Kaplan's L(C_min))

    def n_star(self, budget: float) -> float:
        return float(self.n_law(budget))

    def d_star(self, budget: float) -> float:
        return float(self.d_law(budget))

    def min_loss(self, budget: float) -> float:
        return float(self.loss_law(budget))


def fit_compute_optimal(observations: Sequence[Observation]) -> ComputeOptimal:
    """Per budget a parabola's N* and minimum loss, then N*(C), D*(C) and L*(C) power laws; ScalingError naming the
    budget that fails."""
    parabolas = {}
    for budget, group in by_budget(observations).items():
        try:
            parabolas[budget] = fit_parabola([o.n_params for o in group], [o.loss for o in group])
        except ScalingError as error:
            raise ScalingError(f"budget {budget:.3g} FLOPs: {error}") from None
    budgets = list(parabolas)
    n_stars = [parabolas[c].n_star for c in budgets]
    d_stars = [tokens_for(c, n) for c, n in zip(budgets, n_stars)]
    return ComputeOptimal(parabolas, fit_power_law(budgets, n_stars), fit_power_law(budgets, d_stars),
                          fit_power_law(budgets, [parabolas[c].min_loss for c in budgets]))


# --- the parametric loss (approach 3) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan  # the fit's mean Huber loss / delta

    def __call__(self, n_params, tokens):
        n, d = np.asarray(n_params, np.float64), np.asarray(tokens, np.float64)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def as_theta(self) -> np.ndarray:
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])

    @classmethod
    def from_theta(cls, theta: np.ndarray, objective: float = math.nan) -> ParametricLaw:
        a, b, e, alpha, beta = (float(v) for v in theta)
        return cls(math.exp(e), math.exp(a), math.exp(b), alpha, beta, objective)


def huber(residuals: np.ndarray, delta: float) -> np.ndarray:
    """Quadratic within delta, linear beyond (continuous value and slope)."""
    size = np.abs(residuals)
    return np.where(size <= delta, 0.5 * residuals ** 2, delta * (size - 0.5 * delta))


def _log_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """theta [..., 5] -> the three terms' logs [..., runs, 3]: ln(A / N^alpha), ln(B / D^beta), ln E."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    return np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (a - alpha * log_n).shape)], axis=-1)


def parametric_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                         delta: float) -> np.ndarray:
    """Mean Huber loss / delta of ln L_predicted - ln L_observed, for one theta [5] or a grid [..., 5]."""
    terms = _log_terms(np.asarray(theta, np.float64), log_n, log_d)
    residuals = np.logaddexp.reduce(terms, axis=-1) - log_loss  # [..., runs]
    return huber(residuals, delta).mean(axis=-1) / delta


def _objective_and_gradient(theta, log_n, log_d, log_loss, delta):
    terms = _log_terms(theta, log_n, log_d)  # [runs, 3]
    predicted = np.logaddexp.reduce(terms, axis=-1)
    residuals = predicted - log_loss
    weights = np.exp(terms - predicted[:, None])  # softmax over the three terms: d predicted / d term
    slope = np.clip(residuals, -delta, delta) / (delta * len(residuals))  # d objective / d residual
    gradient = np.array([slope @ weights[:, 0], slope @ weights[:, 1], slope @ weights[:, 2],
                         -(slope * weights[:, 0]) @ log_n, -(slope * weights[:, 1]) @ log_d])
    return float(huber(residuals, delta).mean() / delta), gradient


def single_threaded_blas():
    """A context with BLAS on one thread, where threadpoolctl is installed: scipy's L-BFGS-B makes tiny BLAS calls,
    and a threaded OpenBLAS made each iteration 10x slower on a busy 2-core machine (2.6 ms instead of 0.3)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def initial_grid() -> np.ndarray:
    """Chinchilla's initialisations as theta rows [points, 5] (a, b, e, alpha, beta)."""
    g = INITIAL_GRID
    return np.array([(a, b, e, alpha, beta) for a, b, e, alpha, beta
                     in itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])], np.float64)


def fit_parametric_law(n_params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
                       delta: float = HUBER_DELTA, starts: int = 8,
                       initial: Sequence[np.ndarray] = ()) -> ParametricLaw:
    """Approach 3: L-BFGS-B on the Huber objective from the `starts` best grid points (and any `initial` thetas);
    the best optimum is kept. ScalingError with fewer than 5 runs."""
    from scipy.optimize import minimize

    if len(losses) < MIN_RUNS_PER_PARAMETRIC_FIT:
        raise ScalingError(f"the parametric fit L(N, D) has 5 parameters and needs at least "
                           f"{MIN_RUNS_PER_PARAMETRIC_FIT} runs, got {len(losses)}; train more runs")
    if min(losses) <= 0:
        raise ScalingError("losses must be positive for a fit in log space")
    log_n, log_d = np.log(np.asarray(n_params, np.float64)), np.log(np.asarray(tokens, np.float64))
    log_loss = np.log(np.asarray(losses, np.float64))
    grid = initial_grid()
    values = parametric_objective(grid, log_n, log_d, log_loss, delta)  # [points]
    points = [grid[i] for i in np.argsort(values)[:starts]] + [np.asarray(t, np.float64) for t in initial]
    bounds = [(None, None)] * 3 + [EXPONENT_BOUNDS] * 2
    best = None
    with single_threaded_blas():
        for theta in points:
            theta = np.clip(theta, [-np.inf] * 3 + [EXPONENT_BOUNDS[0]] * 2, [np.inf] * 3 + [EXPONENT_BOUNDS[1]] * 2)
            result = minimize(_objective_and_gradient, theta, args=(log_n, log_d, log_loss, delta), jac=True,
                              method="L-BFGS-B", bounds=bounds,
                              options={"maxiter": 500, "ftol": 1e-13, "gtol": 1e-10})
            if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
                best = result
    if best is None:
        raise ScalingError("the parametric fit found no finite optimum from any initialisation")
    return ParametricLaw.from_theta(best.x, float(best.fun))


def fit_loss_law(observations: Sequence[Observation], **options) -> ParametricLaw:
    return fit_parametric_law([o.n_params for o in observations], [o.tokens for o in observations],
                              [o.loss for o in observations], **options)


# --- the bootstrap ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals {name: (low, high)} of every number `estimate` returned, over the samples that fitted."""

    intervals: dict
    samples: int  # resamples that fitted
    failures: int  # resamples whose fit raised ScalingError (e.g. a budget left with fewer than 3 sizes)
    first_failure: str | None


def resample_within_budgets(observations: Sequence[Observation], rng: np.random.Generator,
                            max_draws: int = 100) -> list[Observation]:
    """A bootstrap resample: each budget's runs drawn with replacement, as many as it has; a budget's draw is
    repeated (up to max_draws times) until it holds 3 distinct sizes, or all it has when fewer: a parabola needs 3
    (with 5 sizes a plain draw has fewer about one time in ten)."""
    resample = []
    for group in by_budget(observations).values():
        wanted = min(MIN_SIZES_PER_PARABOLA, len({o.n_params for o in group}))
        for _ in range(max_draws):
            drawn = [group[i] for i in rng.integers(0, len(group), len(group))]
            if len({o.n_params for o in drawn}) >= wanted:
                break
        resample.extend(drawn)
    return resample


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, np.float64), [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(observations: Sequence[Observation], estimate: Callable[[list[Observation]], dict], *,
              samples: int = 200, seed: int = 0, level: float = 0.95, progress: bool = False) -> BootstrapResult:
    """Refit `estimate` (resample -> {name: number}) on `samples` resamples within budgets; percentile intervals."""
    rng = np.random.default_rng(seed)
    collected: dict[str, list[float]] = {}
    failures, first_failure = 0, None
    indices = range(samples)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="bootstrap", unit="fit", leave=False)
    with single_threaded_blas():  # entered once: each fit's own entering would cost more than some fits
        for _ in indices:
            try:
                numbers = estimate(resample_within_budgets(observations, rng))
            except ScalingError as error:
                failures, first_failure = failures + 1, first_failure or str(error)
                continue
            for name, value in numbers.items():
                collected.setdefault(name, []).append(float(value))
    intervals = {name: percentile_interval(values, level) for name, values in collected.items()}
    return BootstrapResult(intervals, samples - failures, failures, first_failure)


# --- everything together -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingFit:
    compute_optimal: ComputeOptimal
    loss_law: ParametricLaw


def fit_scaling(observations: Sequence[Observation], *, delta: float = HUBER_DELTA, starts: int = 8,
                initial: Sequence[np.ndarray] = ()) -> ScalingFit:
    """Both fits on the same runs; ScalingError when either cannot be made."""
    return ScalingFit(fit_compute_optimal(observations),
                      fit_loss_law(observations, delta=delta, starts=starts, initial=initial))


def prediction(fit: ScalingFit, budget: float) -> dict:
    """At `budget`: N* and D* from approach 2, the loss approach 3 gives there, and approach 2's L*(C)."""
    n_star, d_star = fit.compute_optimal.n_star(budget), fit.compute_optimal.d_star(budget)
    return {"budget": budget, "n_params": n_star, "tokens": d_star, "loss": float(fit.loss_law(n_star, d_star)),
            "isoflop_loss": fit.compute_optimal.min_loss(budget)}


def fit_numbers(fit: ScalingFit, predict_budget: float | None = None,
                check_point: tuple[float, float] | None = None) -> dict[str, float]:
    """Every fitted number by name (what the bootstrap gives intervals for): the power laws, the parametric law,
    the prediction at predict_budget, and the law's loss at check_point (N, D)."""
    optimal, law = fit.compute_optimal, fit.loss_law
    numbers = {"n_law.coefficient": optimal.n_law.coefficient, "n_law.exponent": optimal.n_law.exponent,
               "d_law.coefficient": optimal.d_law.coefficient, "d_law.exponent": optimal.d_law.exponent,
               "min_loss_law.coefficient": optimal.loss_law.coefficient,
               "min_loss_law.exponent": optimal.loss_law.exponent,
               "E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta}
    if predict_budget is not None:
        predicted = prediction(fit, predict_budget)
        numbers.update({"prediction.n_params": predicted["n_params"], "prediction.tokens": predicted["tokens"],
                        "prediction.loss": predicted["loss"], "prediction.isoflop_loss": predicted["isoflop_loss"]})
    if check_point is not None:
        numbers["check.loss"] = float(law(*check_point))
    return numbers
