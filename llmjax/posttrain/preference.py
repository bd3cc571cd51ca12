"""Preference optimization on (prompt, chosen, rejected) pairs: DPO, and the reference-free SimPO and ORPO.

    pairs = read_pairs("pairs.jsonl")                     # or pairs_from_task(TASKS["arithmetic"], 1000, seed=0)
    data = tokenize_pairs(pairs, tokenizer, chat_format, seq_len=512)   # rows [2 * pairs, seq_len] + reply masks
    data = with_reference_logps(data, base_params, cfg)  # log pi_ref(reply), once, before any update
    summary = train_preferences(base_params, cfg, data, held_out, PreferenceObjective("dpo", beta=0.1),
                                train_cfg, PreferenceRun(run_dir))   # metrics, checkpoints, curves in run_dir

The data flow and its choices:

- JSONL -> pairs. One pair per line, {"prompt": [messages...] or "text", "chosen": "reply", "rejected": "reply"}; a
  text prompt is one user message. Every problem (bad JSON, a missing field, an empty reply, chosen == rejected,
  which states no preference) is a `ChatDataError` naming the file and line. For a verifiable task,
  `pairs_from_task` makes pairs without sampling: the reference reply against the same reply with a wrong value;
  `pairs_from_samples` makes them from the model's own samples: a right reply against a wrong one.
- pair -> ids. The prompt is rendered with the chat template and the assistant's turn opened
  (add_generation_prompt=True) and tokenized as a prompt (the model file's BOS, never its EOS); each reply is what
  rendering the whole conversation (add_generation_prompt=False) adds after that prompt: the reply text and the
  template's end-of-turn, as `chat_data` trains it. Only reply tokens are scored.
- ids -> rows. The two sequences of a pair share the prompt; each is one row of seq_len + 1 tokens, right-padded
  (inputs and targets are its two seq_len views; causal attention never lets a real token see the padding).
  Layout: all chosen rows first, then all rejected rows in the same pair order, so row p and row pairs + p are the
  two answers of pair p; a batch of pair indices keeps that layout: [chosen rows of the batch; rejected rows].
  A pair longer than a row is skipped and counted, never cut; ChatDataError when none fits.
- reference. DPO's reward is beta * (log pi(y) - log pi_ref(y)); log pi_ref of every reply is computed once with
  the frozen base before training and kept with the rows (`reference_logps` [2 * pairs]), so training holds one
  model. SimPO and ORPO do not need it; it still gives their runs the `kl` metric (log pi - log pi_ref on the data).
- training. Full fine-tuning with the optimizer of `llmjax.train.optim` (AdamW, the run's schedule, global-norm
  clipping), one jitted step on one device, batches of pairs in a seeded order per epoch (so a resumed run picks up
  the same order), checkpoints in `llmjax.train`'s TrainState layout: `load_model(ckpt=RUN)`, `generate --ckpt RUN`
  and `serve --ckpt RUN` read the result. Or LoRA (`lora_cfg`): the policy is the frozen base plus adapters, and the
  reference is that base with the adapters off, so reference_logps are the base's as above and no second copy of the
  weights exists; adapter checkpoints in run/lora-checkpoints, the merged model in run/checkpoints at the end
  (`llmjax.peft.run`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model import forward
from llmjax.nn import fp8
from llmjax.peft.lora import LoraConfig, lora_forward
from llmjax.peft.run import (
    export_lora_run,
    lora_checkpointer,
    lora_record,
    restore_or_init_lora,
)
from llmjax.peft.train import make_lora_optimizer
from llmjax.posttrain.chat_data import (
    ChatDataError,
    check_conversation,
    jsonl_records,
    tokenize_conversation,
)
from llmjax.posttrain.losses import (
    dpo_loss,
    mean_log_probs,
    orpo_loss,
    sequence_log_probs,
    simpo_loss,
    token_log_probs,
)
from llmjax.posttrain.tasks import (
    Problem,
    Task,
    correctness_reward,
    parse_integer,
    parse_list,
    problems,
    prompt_messages,
    reference_reply,
    score,
)
from llmjax.train.checkpoint import Checkpointer, run_record
from llmjax.train.loop import (
    MetricsLog,
    StopRequest,
    TrainingError,
    plot_losses,
    read_metrics,
)
from llmjax.train.optim import learning_rate_schedule, make_optimizer
from llmjax.train.state import TrainState, train_state_from_params

LOSSES = ("dpo", "simpo", "orpo")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages) and two replies to it, the first preferred."""

    prompt: tuple[dict, ...]
    chosen: str
    rejected: str


# --- JSONL -> pairs ---------------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """The pairs of a JSONL file, one per non-blank line (see the module docstring); ChatDataError naming the file
    and line for anything else, and for a file without any pair."""
    path = Path(path)
    pairs = []
    for where, record in jsonl_records(path):
        pairs.append(pair_from_record(record, where))
    if not pairs:
        raise ChatDataError(f'{path} holds no pairs (one JSON object per line, {{"prompt": ..., "chosen": ..., '
                            '"rejected": ...}})')
    return pairs


def pair_from_record(record, where: str = "pair") -> PreferencePair:
    """One JSON record as a checked PreferencePair; ChatDataError prefixed with `where`."""
    expected = '{"prompt": [messages] or "text", "chosen": "reply", "rejected": "reply"}'
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected an object {expected}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        raise ChatDataError(f"{where}: missing {', '.join(repr(key) for key in missing)}; expected {expected}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise ChatDataError(f'{where}: "prompt" must be a list of messages or a text, got {type(prompt).__name__}')
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], str):
            raise ChatDataError(f'{where}: "{key}" must be the reply text, got {type(record[key]).__name__}')
        if not record[key].strip():
            raise ChatDataError(f'{where}: "{key}" is an empty reply')
    if record["chosen"] == record["rejected"]:
        raise ChatDataError(f'{where}: "chosen" and "rejected" are the same reply, so the pair states no preference; '
                            "drop it or give a different rejected reply")
    messages = check_conversation([*prompt, {"role": "assistant", "content": record["chosen"]}], where)[:-1]
    return PreferencePair(tuple(messages), record["chosen"], record["rejected"])


# --- verifiable tasks -> pairs ----------------------------------------------------------------------------------


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong value in the answer's own format: an integer off by 1 to 3 either way; a list rotated by one
    (or with an item more, when rotating changes nothing)."""
    value = parse_integer(problem.answer)
    if value is not None:
        return str(value + rng.choice((-3, -2, -1, 1, 2, 3)))
    items = parse_list(problem.answer) or [problem.answer]
    rotated = items[1:] + items[:1]
    return ", ".join(rotated if rotated != items else items + items[-1:])


def pairs_from_task(task: Task, count: int, seed: int = 0,
                    wrong_answer_fn: Callable[[Problem, random.Random], str] | None = None,
                    split: str = "train") -> list[PreferencePair]:
    """`count` pairs from the task's `split` problems: chosen = `reference_reply(problem)`, rejected = the same reply
    with the value wrong_answer_fn(problem, rng) gives (default `wrong_answer`), so preference training can be run
    and checked without sampling. Deterministic in (task, count, seed)."""
    wrong_answer_fn = wrong_answer_fn or wrong_answer
    rng = random.Random(f"pairs/{task.name}/{split}/{seed}")
    pairs = []
    for problem in problems(task, split, count, seed):
        rejected = reference_reply(Problem(problem.question, wrong_answer_fn(problem, rng)))
        chosen = reference_reply(problem)
        if rejected == chosen:
            raise ValueError(f"wrong_answer_fn gave the right answer {problem.answer!r} for {problem.question!r}")
        pairs.append(PreferencePair(tuple(prompt_messages(problem, task)), chosen, rejected))
    return pairs


@dataclass(frozen=True)
class SampledPairs:
    """Pairs made from a model's own samples, and what became of the problems: those whose samples were all right
    or all wrong state no preference and are skipped (counted here)."""

    pairs: list[PreferencePair]
    problems: int
    all_right: int
    all_wrong: int


def pairs_from_samples(task: Task, problems_: Sequence[Problem], replies: Sequence[Sequence[str]],
                       reward_fn: Callable | None = None, seed: int = 0) -> SampledPairs:
    """One pair per problem from replies[i], the model's own sampled replies to problems_[i]: chosen = a reply that
    reward_fn (default `correctness_reward`) scores highest, rejected = one it scores lowest, each picked at random
    (seeded) among its ties; problems whose (non-empty) replies all score the same are skipped and counted (as all
    wrong when none scores above 0). Replies are scored
    through `tasks.score`, so a misbehaving reward function is one RewardError."""
    if len(problems_) != len(replies):
        raise ValueError(f"pairs_from_samples: {len(problems_)} problems but {len(replies)} lists of replies")
    reward_fn = reward_fn or correctness_reward
    rng = random.Random(f"sampled-pairs/{task.name}/{seed}")
    pairs, all_right, all_wrong = [], 0, 0
    for problem, answers in zip(problems_, replies):
        answers = [answer for answer in answers if answer.strip()]  # an empty reply makes no pair
        rewards = [score(reward_fn, answer, problem, task) for answer in answers]
        best, worst = max(rewards, default=0.0), min(rewards, default=0.0)
        if best == worst:
            all_right += best > 0
            all_wrong += best <= 0
            continue
        chosen = rng.choice([a for a, r in zip(answers, rewards) if r == best])
        rejected = rng.choice([a for a, r in zip(answers, rewards) if r == worst])
        pairs.append(PreferencePair(tuple(prompt_messages(problem, task)), chosen, rejected))
    return SampledPairs(pairs, len(problems_), all_right, all_wrong)


# --- pairs -> ids -> rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPair:
    """A pair's prompt ids (BOS rule applied, no EOS) and each reply's ids (text + the template's end-of-turn)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pair(pair: PreferencePair, tokenizer, chat_format, index: int | None = None) -> TokenizedPair:
    """The ids of a pair (see the module docstring): each answer's conversation tokenized as SFT tokenizes it
    (`chat_data.tokenize_conversation`), split where its final reply begins; ChatDataError when the template refuses
    the messages or does not render them turn by turn."""
    name = "pair" if index is None else f"pair {index}"

    def prompt_and_reply(reply: str) -> tuple[list[int], list[int]]:
        chat = tokenize_conversation([*pair.prompt, {"role": "assistant", "content": reply}], tokenizer, chat_format,
                                     index=index)
        start = len(chat.ids) - next(i for i, trained in enumerate(reversed(chat.assistant)) if not trained)
        return chat.ids[:start], chat.ids[start:]  # the rendered conversation ends with its final reply

    prompt, chosen = prompt_and_reply(pair.chosen)
    prompt_again, rejected = prompt_and_reply(pair.rejected)
    if prompt_again != prompt:
        raise ChatDataError(f"{name}: the prompt is tokenized differently before its two replies")
    return TokenizedPair(prompt, chosen, rejected)


@dataclass(frozen=True)
class PreferenceData:
    """Pairs as rows (layout in the module docstring): inputs / targets int32 and loss_mask float32 (1 where the
    target is a reply token), each [2 * pairs, seq_len]; reference_logps [2 * pairs] float32, the base model's summed
    log p(reply) per row, or None before `with_reference_logps`; skipped_too_long: pairs left out."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    reference_logps: np.ndarray | None
    skipped_too_long: int

    def __len__(self) -> int:
        """The number of pairs."""
        return self.inputs.shape[0] // 2

    def batch(self, pair_indices) -> dict[str, np.ndarray]:
        """The batch of the given pairs: its chosen rows, then its rejected rows ([2 * len(pair_indices), seq_len];
        reference_logps [2 * len(pair_indices)] when computed)."""
        pair_indices = np.asarray(pair_indices)
        rows = np.concatenate([pair_indices, pair_indices + len(self)])
        batch = {"inputs": self.inputs[rows], "targets": self.targets[rows], "loss_mask": self.loss_mask[rows]}
        if self.reference_logps is not None:
            batch["reference_logps"] = self.reference_logps[rows]
        return batch


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, chat_format, seq_len: int,
                   pad_id: int = 0) -> PreferenceData:
    """Rows of seq_len + 1 tokens per reply (see the module docstring); pairs whose longer sequence does not fit are
    skipped and counted; ChatDataError when none fits."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    width = seq_len + 1
    tokenized = [tokenize_pair(pair, tokenizer, chat_format, index) for index, pair in enumerate(pairs)]
    fitting = [t for t in tokenized if len(t.prompt) + max(len(t.chosen), len(t.rejected)) <= width]
    if not fitting:
        longest = max((len(t.prompt) + max(len(t.chosen), len(t.rejected)) for t in tokenized), default=0)
        raise ChatDataError(f"no pair fits a row of seq_len + 1 = {width} tokens (of {len(pairs)}, the longest "
                            f"prompt + reply has {longest} tokens); raise --seq or shorten the pairs")
    sequences = [(t.prompt, t.chosen) for t in fitting] + [(t.prompt, t.rejected) for t in fitting]
    tokens = np.full((len(sequences), width), pad_id, np.int32)  # [2 * pairs, seq_len + 1]
    reply = np.zeros((len(sequences), width), np.bool_)
    for row, (prompt, answer) in enumerate(sequences):
        tokens[row, :len(prompt) + len(answer)] = prompt + answer
        reply[row, len(prompt):len(prompt) + len(answer)] = True
    return PreferenceData(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=reply[:, 1:].astype(np.float32),
                          reference_logps=None, skipped_too_long=len(pairs) - len(fitting))


# --- log-probabilities and the losses ---------------------------------------------------------------------------


def reply_token_log_probs(params: dict, batch: dict, cfg: ModelConfig, adapters: dict | None = None,
                          lora_cfg: LoraConfig | None = None, rng: jax.Array | None = None) -> jax.Array:
    """log p(target) at every position [rows, seq_len] float32, reply or not (the losses keep the reply's), of the
    model `params`, or with lora_cfg of `params` plus `adapters` (rng: their dropout; None: off)."""
    if lora_cfg is None:
        logits = forward(params, batch["inputs"], cfg)  # [rows, seq_len, padded_vocab] float32
    else:
        logits = lora_forward(params, adapters, batch["inputs"], cfg, lora_cfg, rng=rng)
    return token_log_probs(logits, batch["targets"], cfg.vocab_size)


@functools.partial(jax.jit, static_argnames="cfg")
def _sequence_logps(params: dict, batch: dict, cfg: ModelConfig) -> jax.Array:
    """Summed log p(reply) per row [rows]."""
    return sequence_log_probs(reply_token_log_probs(params, batch, cfg), batch["loss_mask"])


def with_reference_logps(data: PreferenceData, params: dict, cfg: ModelConfig, rows_per_call: int = 16
                         ) -> PreferenceData:
    """The data with reference_logps: the summed log p(reply) of every row under `params` (the frozen base), in
    calls of rows_per_call rows (the last padded with copies of row 0: one compiled shape)."""
    rows = data.inputs.shape[0]
    logps = []
    for start in range(0, rows, rows_per_call):
        index = np.arange(start, start + rows_per_call)
        index = np.where(index < rows, index, 0)
        chunk = {"inputs": data.inputs[index], "targets": data.targets[index], "loss_mask": data.loss_mask[index]}
        logps.append(np.asarray(_sequence_logps(params, chunk, cfg)))
    return dataclasses.replace(data, reference_logps=np.concatenate(logps)[:rows].astype(np.float32))


@dataclass(frozen=True)
class PreferenceObjective:
    """Which preference loss and its settings (hashable: a static argument of the jitted step).

    loss: "dpo" (needs reference_logps), "simpo" or "orpo" (reference-free). beta: DPO's KL strength, or SimPO's
    reward scale; gamma: SimPO's target margin; lam: ORPO's weight of the odds-ratio term; label_smoothing: DPO's
    probability of a flipped label (conservative DPO); nll_weight: DPO / SimPO plus this times the chosen replies'
    mean token NLL (RPO, Pang et al. 2024; TRL's rpo_alpha), which holds the chosen replies' likelihood up while
    the margin grows (ORPO has this term already)."""

    loss: str = "dpo"
    beta: float = 0.1
    gamma: float = 1.0
    lam: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            raise ValueError(f"beta {self.beta}: must be > 0")
        if not (math.isfinite(self.nll_weight) and self.nll_weight >= 0):
            raise ValueError(f"nll_weight {self.nll_weight}: must be a finite number >= 0")
        if self.nll_weight and self.loss == "orpo":
            raise ValueError("nll_weight: ORPO's loss already has the chosen replies' NLL (its weight is 1)")


def preference_loss(params: dict, batch: dict, cfg: ModelConfig, objective: PreferenceObjective = PreferenceObjective(),
                    adapters: dict | None = None, lora_cfg: LoraConfig | None = None, rng: jax.Array | None = None
                    ) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a batch laid out as `PreferenceData.batch` gives it ([chosen rows; rejected rows]), for the
    policy `params`, or with lora_cfg `params` plus `adapters` (see reply_token_log_probs).

    DPO scores replies by their summed log-probs against batch["reference_logps"]; SimPO and ORPO by their
    length-averaged log-probs (ORPO's NLL is the chosen replies' mean token NLL). Metrics: the loss's own
    (accuracy, reward_margin, ...; ORPO's reward_margin is its log odds ratio), chosen_logps / rejected_logps (mean
    summed log p of the replies, whatever the loss: a collapse of the chosen replies shows here) and, when the batch
    has reference_logps, kl (the mean of log pi - log pi_ref over both replies)."""
    token_logps = reply_token_log_probs(params, batch, cfg, adapters, lora_cfg, rng)  # [2 * pairs, seq_len]
    mask = batch["loss_mask"]
    pairs = token_logps.shape[0] // 2
    summed = sequence_log_probs(token_logps, mask)  # [2 * pairs]
    averaged = mean_log_probs(token_logps, mask)  # [2 * pairs]
    reference = batch.get("reference_logps")
    if objective.loss == "dpo":
        if reference is None:
            raise ValueError("preference_loss: DPO needs the batch's reference_logps (with_reference_logps)")
        loss, metrics = dpo_loss(summed[:pairs], summed[pairs:], reference[:pairs], reference[pairs:],
                                 beta=objective.beta, label_smoothing=objective.label_smoothing)
    elif objective.loss == "simpo":
        loss, metrics = simpo_loss(averaged[:pairs], averaged[pairs:], beta=objective.beta, gamma=objective.gamma)
    else:
        loss, metrics = orpo_loss(averaged[:pairs], averaged[pairs:], -averaged[:pairs], lam=objective.lam)
        metrics["reward_margin"] = metrics["log_odds_ratio"]
    if objective.nll_weight:
        chosen_nll = -jnp.mean(averaged[:pairs])
        loss = loss + objective.nll_weight * chosen_nll
        metrics["chosen_nll"] = chosen_nll
    metrics = {**metrics, "loss": loss, "chosen_logps": jnp.mean(summed[:pairs]),
               "rejected_logps": jnp.mean(summed[pairs:])}
    if reference is not None:
        metrics["kl"] = jnp.mean(summed - jax.lax.stop_gradient(reference))
    return loss, metrics


def preference_step(state, batch: dict, base: dict | None = None, rng: jax.Array | None = None, *, cfg: ModelConfig,
                    train_cfg: TrainConfig, objective: PreferenceObjective, lora_cfg: LoraConfig | None = None):
    """One optimizer update on the batch's preference loss (AdamW with the run's schedule and clipping) -> (state,
    metrics). Full fine-tuning: `state` is a TrainState, every weight trains. LoRA (lora_cfg): `state` is a
    `llmjax.peft.train.LoraState`, the policy is the frozen `base` params plus its adapters (dropout keyed by rng and
    the step), and only the adapters train."""
    if lora_cfg is None:
        trainable, optimizer = state.params, make_optimizer(train_cfg, model_cfg=cfg)
        loss_fn = functools.partial(preference_loss, batch=batch, cfg=cfg, objective=objective)
    else:
        trainable, optimizer = state.adapters, make_lora_optimizer(train_cfg)
        step_rng = None if rng is None else jax.random.fold_in(rng, state.step)

        def loss_fn(adapters):
            return preference_loss(base, batch, cfg, objective, adapters, lora_cfg, step_rng)

    (_, metrics), grads_and_histories = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = fp8.without_histories(grads_and_histories)  # FP8 delayed scaling: histories' gradients are next values
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate_schedule(train_cfg)(state.step)}
    trained = fp8.take_new_histories(optax.apply_updates(trainable, updates), grads_and_histories)
    return type(state)(state.step + 1, trained, opt_state), metrics  # same fields


# Jitted once per (configs, objective, shapes) for the whole process: a resumed run in the same process (and every
# evaluation) reuses the compiled programs.
jitted_preference_step = jax.jit(preference_step, static_argnames=("cfg", "train_cfg", "objective", "lora_cfg"),
                                 donate_argnums=0)
jitted_preference_loss = jax.jit(preference_loss, static_argnames=("cfg", "objective", "lora_cfg"))


# --- batches and the loop ---------------------------------------------------------------------------------------


def step_pairs(step: int, pairs: int, batch_pairs: int, seed: int) -> np.ndarray:
    """The pair indices of training step `step`: epoch step // batches-per-epoch, whose order is a permutation
    seeded by (seed, epoch); the last partial batch of an epoch is dropped (one compiled shape)."""
    per_epoch = pairs // batch_pairs
    if per_epoch == 0:
        raise ChatDataError(f"{pairs} training pairs make no batch of {batch_pairs}; lower --batch or give more pairs")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(pairs)
    return order[index * batch_pairs:(index + 1) * batch_pairs]


@dataclass(frozen=True)
class PreferenceRun:
    """Where a preference run writes and how often it logs, evaluates and saves; batch_pairs pairs per step."""

    run_dir: Path
    batch_pairs: int = 8
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 3
    progress: bool = True


def evaluate(eval_fn, params: dict, data: PreferenceData, batch_pairs: int) -> dict[str, float]:
    """The mean metrics over every pair of `data`, in order, in batches of batch_pairs pairs (a smaller last batch
    for the remainder, weighted by its size: one more compiled shape, the same pairs at every evaluation)."""
    totals: dict[str, float] = {}
    for start in range(0, len(data), batch_pairs):
        indices = np.arange(start, min(start + batch_pairs, len(data)))
        _, metrics = eval_fn(params, data.batch(indices))
        for key, value in jax.device_get(metrics).items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(indices) / len(data)
    return totals


def restore_or_start(params: dict, cfg: ModelConfig, train_cfg: TrainConfig, checkpointer: Checkpointer,
                   device) -> tuple[TrainState, int]:
    """(state, step): the newest readable checkpoint's, or step 0 over the base params."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.eval_shape(lambda: train_state_from_params(params, cfg, train_cfg))
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract)
    restored = checkpointer.restore_latest(abstract, cfg)
    if restored is not None:
        return restored[0], int(restored[0].step)
    # every leaf committed to the device (the step counter too), as the step's outputs are: one compilation
    return jax.device_put(train_state_from_params(params, cfg, train_cfg), device), 0


def train_preferences(params: dict, cfg: ModelConfig, train_data: PreferenceData, validation: PreferenceData | None,
                      objective: PreferenceObjective, train_cfg: TrainConfig, run: PreferenceRun,
                      lora_cfg: LoraConfig | None = None, base_model: str = "") -> dict:
    """Train the base `params` on the pairs until train_cfg.total_steps, resuming from run_dir's newest checkpoint.

    Writes run/metrics.jsonl ("train" records every log_every steps, "validation" ones at step 0 of a fresh run,
    every eval_every steps and at the end), run/checkpoints/<step> (TrainState, as `llmjax.train` writes them),
    run/loss.png and run/preference.png. The data must carry reference_logps for DPO. One device (the first); the
    base params are consumed (donated to the first step). Returns a summary: start_step, end_step, train (the last
    logged metrics), validation (the last evaluation's) and initial_validation (step 0's, on a fresh run).

    With lora_cfg only adapters train, over the frozen `params` (kept, not consumed): run/lora-checkpoints/<step> hold
    them, and at the end run/checkpoints/<step> holds the merged model and run/adapter/ the PEFT files naming
    base_model (`llmjax.peft.run`); the summary's export says what was written."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    key = jax.random.key(run.seed)
    if lora_cfg is None:
        checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=run.keep_last, async_save=False)
        state, start_step = restore_or_start(params, cfg, train_cfg, checkpointer, device)
        params = None  # consumed: the state holds the policy
        eval_fn = functools.partial(jitted_preference_loss, cfg=cfg, objective=objective)
    else:  # the base stays: the frozen part of the policy (and, adapters off, the reference)
        checkpointer = lora_checkpointer(run_dir, run.keep_last)
        params = jax.device_put(params, device)
        state, start_step = restore_or_init_lora(params, cfg, lora_cfg, train_cfg, checkpointer,
                                                 jax.random.fold_in(key, 0), device)

        def eval_fn(adapters, batch):
            return jitted_preference_loss(params, batch, cfg=cfg, objective=objective, adapters=adapters,
                                          lora_cfg=lora_cfg)

    train_step = functools.partial(jitted_preference_step, base=params, rng=key, cfg=cfg, train_cfg=train_cfg,
                                   objective=objective, lora_cfg=lora_cfg)
    metrics_log, stop = MetricsLog(run_dir), StopRequest()
    progress = tqdm(total=train_cfg.total_steps, initial=start_step, desc=objective.loss, unit="step",
                    disable=not run.progress, dynamic_ncols=True)
    summary: dict = {"start_step": start_step}

    def validate(step: int) -> None:
        if validation is None:
            return
        values = evaluate(eval_fn, state.params if lora_cfg is None else state.adapters, validation,
                          run.batch_pairs)
        metrics_log.write(step, "validation", values)
        summary["validation"] = values
        if step == 0:
            summary["initial_validation"] = values
        progress.write(f"step {step}: held-out accuracy {values['accuracy']:.3f}, margin "
                       f"{values['reward_margin']:.4f}, chosen log p {values['chosen_logps']:.3f}")

    def save(step: int) -> None:
        record = run_record(cfg, train_cfg, loader_state={"step": step, "seed": run.seed}, seed=run.seed,
                            extra={"preference": dataclasses.asdict(objective),
                                   **({} if lora_cfg is None else {"lora": lora_record(lora_cfg)})})
        checkpointer.save(state, record=record)

    try:
        if start_step == 0:
            validate(0)
        for step in range(start_step, train_cfg.total_steps):
            batch = train_data.batch(step_pairs(step, len(train_data), run.batch_pairs, run.seed))
            state, metrics = train_step(state, batch)
            done = step + 1
            progress.update(1)
            if done % run.log_every == 0 or done == train_cfg.total_steps or stop.requested:
                values = {key: float(value) for key, value in jax.device_get(metrics).items()}
                if not math.isfinite(values["loss"]):
                    raise TrainingError(f"loss is {values['loss']} at step {done}: lower --lr or --beta")
                metrics_log.write(done, "train", values)
                summary["train"] = values
                progress.set_postfix(loss=f"{values['loss']:.3f}", accuracy=f"{values['accuracy']:.2f}")
            if done % run.eval_every == 0 or done == train_cfg.total_steps:
                validate(done)
            if done % run.save_every == 0 or done == train_cfg.total_steps or stop.requested:
                save(done)
            if stop.requested:
                progress.write(f"SIGTERM: saved step {done} and stopped; run the same command to resume")
                summary["stopped_at"] = done
                return summary
        summary["end_step"] = max(train_cfg.total_steps, start_step)
        if lora_cfg is not None:
            summary["export"] = export_lora_run(run_dir, params, state.adapters, cfg, lora_cfg, train_cfg,
                                                step=int(state.step), seed=run.seed, base_model=base_model)
        return summary
    finally:
        stop.restore()
        progress.close()
        checkpointer.close()
        metrics_log.close()
        if jax.process_index() == 0:
            plot_losses(run_dir)
            plot_preferences(run_dir)


def plot_preferences(run_dir: Path) -> Path | None:
    """run/preference.png: held-out preference accuracy, reward margin, and the chosen and rejected replies' mean
    log-probabilities (which DPO may push down together) against step (None without any evaluation)."""
    records = [r for r in read_metrics(run_dir) if r["kind"] == "validation" and "accuracy" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, (accuracy, margin, logps) = plt.subplots(1, 3, figsize=(13, 3.6), dpi=120)
    accuracy.plot(steps, [r["accuracy"] for r in records], "o-", markersize=3)
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_title("held-out preference accuracy")
    margin.plot(steps, [r["reward_margin"] for r in records], "o-", markersize=3)
    margin.set_title("held-out reward margin")
    for key, label in (("chosen_logps", "chosen"), ("rejected_logps", "rejected")):
        if all(key in r for r in records):
            logps.plot(steps, [r[key] for r in records], "o-", markersize=3, label=label)
    logps.set_title("held-out reply log p (summed)")
    logps.legend()
    for axes in (accuracy, margin, logps):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    figure.suptitle(Path(run_dir).name)
    figure.tight_layout()
    path = Path(run_dir) / "preference.png"
    figure.savefig(path)
    plt.close(figure)
    return path
