"""GRPO's rollouts: G sampled completions of every prompt from the serving engine, and the training rows they make.

    engine = Engine(params, cfg, EngineConfig(...))        # engine.update_weights(params) after each policy update
    rollouts = sample_groups(engine, prompts, group_size=8, sampling=SamplingParams(max_tokens=64, temperature=1.0),
                             seed=step)                   # [prompts * 8], group by group
    answers = complete(engine, prompts, SamplingParams(max_tokens=64))   # one greedy completion each (evaluation)
    batch = completion_rows(rollouts, seq_len=256)        # inputs / targets / completion mask, [prompts * 8, 256]
    ids = task_prompt_ids(problem, task, tokenizer, chat_format)   # a task's question as a chat prompt
    text = reply_text(rollouts[0], tokenizer, end_ids)   # what the reward reads: the completion without end ids

The completions come from the continuous-batching engine (`llmjax.infer.engine`), every request with its own seed
(seed * group_size * prompts + its index), so a rollout batch is reproducible and the G samples of a prompt differ.
`completion_rows` lays each prompt + completion out as one right-padded row; the loss mask marks the positions whose
target is a completion token (the policy's own choices), never the prompt or the padding. The sampling policy's
log-probabilities are not taken from the engine: GRPO recomputes them with the trainer's forward before its first
update (`llmjax.posttrain.losses.token_log_probs`), so the ratio starts at exactly 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmjax.infer.engine import Engine, EngineConfig, QueueFull, SamplingParams
from llmjax.posttrain.tasks import Problem, Task, prompt_messages


@dataclass(frozen=True)
class Rollout:
    """One sampled completion: which prompt (its index in the list given), the ids, and why it ended."""

    prompt_index: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    finish_reason: str  # "stop" (an end id) or "length" (max_tokens)


def rollout_engine_config(prompts: Sequence[Sequence[int]], max_tokens: int, max_seq_len: int, *,
                          max_running: int = 128, num_blocks: int = 2048) -> EngineConfig:
    """The engine's settings for sampling completions of these prompts: a context of the longest prompt +
    max_tokens rounded up to a power-of-two number of 16-token blocks (what the paged attention kernel tiles by;
    at most the model's max_seq_len), so block tables and attention stay short; max_running completions decoded
    together in batches of three compiled sizes (max_running, a half and an eighth of it: fewer programs to compile
    than every power of two, and a rollout batch is full most of the time), up to 8 prompts prefilled per step, and
    a queue that takes every request."""
    longest = max((len(prompt) for prompt in prompts), default=1)
    blocks = -(-(longest + max_tokens) // 16)
    context = min(16 * (1 << (blocks - 1).bit_length()), max_seq_len)
    batch_buckets = tuple(sorted({max(1, max_running // 8), max(1, max_running // 2), max_running}))
    return EngineConfig(num_blocks=num_blocks, block_size=16, max_running=max_running, max_queue=1 << 20,
                        max_model_len=context, max_prefill_rows=8, batch_buckets=batch_buckets)


def sample_groups(engine: Engine, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams, *,
                  seed: int = 0) -> list[Rollout]:
    """group_size completions of every prompt, ordered prompt by prompt (the layout `group_advantages` reads), each
    request sampled with its own seed. ValueError for a group of one (GRPO compares the samples of a prompt: one has
    nothing to compare with) or an engine that is not idle."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least two samples of each prompt to compare")
    rollouts = complete(engine, [prompt for prompt in prompts for _ in range(group_size)], sampling, seed=seed)
    return [dataclasses.replace(rollout, prompt_index=rollout.prompt_index // group_size) for rollout in rollouts]


def complete(engine: Engine, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *, seed: int = 0
             ) -> list[Rollout]:
    """One completion of every prompt, in order, request i sampled with seed seed * len(prompts) + i (greedy when
    sampling.temperature is 0); requests wait for room in the engine's queue. ValueError for a busy engine."""
    if engine.has_unfinished():
        raise ValueError("sampling rollouts needs an idle engine: requests are still waiting or running")
    first_seed = seed * len(prompts)
    tokens: dict[int, list[int]] = {index: [] for index in range(len(prompts))}
    reasons: dict[int, str] = {}
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished():
        while pending:
            index = pending[0]
            params = dataclasses.replace(sampling, seed=(first_seed + index) % 2**32)
            try:
                engine.add_request(f"rollout-{index}", list(prompts[index]), params)
            except QueueFull:
                break
            pending.pop(0)
        for out in engine.step():
            index = int(out.request_id.removeprefix("rollout-"))
            tokens[index].extend(out.new_token_ids)
            if out.finished:
                reasons[index] = out.finish_reason
    return [Rollout(index, tuple(int(t) for t in prompts[index]), tuple(tokens[index]), reasons[index])
            for index in range(len(prompts))]


def completion_rows(rollouts: Sequence[Rollout], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Each rollout's prompt + completion as one row: {"inputs", "targets" [rows, seq_len] int32, "completion_mask"
    [rows, seq_len] float32 (1 where the target is a completion token)}, right-padded; ValueError for a rollout
    longer than seq_len + 1 tokens (ask the engine for fewer max_tokens, or raise seq_len)."""
    rows = len(rollouts)
    tokens = np.full((rows, seq_len + 1), pad_id, np.int32)
    mask = np.zeros((rows, seq_len), np.float32)
    for row, rollout in enumerate(rollouts):
        ids = rollout.prompt_ids + rollout.completion_ids
        if len(ids) > seq_len + 1:
            raise ValueError(f"rollout {row}: prompt + completion are {len(ids)} tokens, more than seq_len + 1 = "
                             f"{seq_len + 1}")
        tokens[row, :len(ids)] = ids
        mask[row, len(rollout.prompt_ids) - 1:len(ids) - 1] = 1.0  # targets at these positions are completion tokens
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "completion_mask": mask}


def task_prompt_ids(problem: Problem, task: Task, tokenizer, chat_format) -> list[int]:
    """The ids of the task's question as a chat prompt with the assistant's turn opened (BOS rule applied)."""
    return tokenizer.encode_prompt(chat_format.render(prompt_messages(problem, task)))


def reply_text(rollout: Rollout, tokenizer, end_ids: Sequence[int]) -> str:
    """The completion as text without its end-of-reply ids: what a reward function reads."""
    return tokenizer.decode([t for t in rollout.completion_ids if t not in end_ids])
