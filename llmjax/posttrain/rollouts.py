"""GRPO's rollouts: G sampled completions of every prompt from the serving engine, and the training rows they make.

    engine = Engine(params, cfg, EngineConfig(...))        # engine.update_weights(params) after each policy update
    rollouts = sample_groups(engine, prompts, group_size=8, sampling=SamplingParams(max_tokens=64, temperature=1.0),
                             seed=step)                   # [prompts * 8], group by group
    batch = completion_rows(rollouts, seq_len=256)        # inputs / targets / completion mask, [prompts * 8, 256]

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

from llmjax.infer.engine import Engine, QueueFull, SamplingParams


@dataclass(frozen=True)
class Rollout:
    """One sampled completion: which prompt (its index in the list given), the ids, and why it ended."""

    prompt_index: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    finish_reason: str  # "stop" (an end id) or "length" (max_tokens)


def sample_groups(engine: Engine, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams, *,
                  seed: int = 0) -> list[Rollout]:
    """group_size completions of every prompt, ordered prompt by prompt (the layout `group_advantages` reads), each
    request sampled with its own seed; requests wait for room in the engine's queue. ValueError for a group of one
    (GRPO compares the samples of a prompt: one has nothing to compare with) or an engine that is not idle."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least two samples of each prompt to compare")
    if engine.has_unfinished():
        raise ValueError("sample_groups needs an idle engine: requests are still waiting or running")
    requests = [(f"rollout-{p}-{g}", p) for p in range(len(prompts)) for g in range(group_size)]
    first_seed = seed * len(requests)
    tokens: dict[str, list[int]] = {request_id: [] for request_id, _ in requests}
    reasons: dict[str, str] = {}
    pending = list(enumerate(requests))
    while pending or engine.has_unfinished():
        while pending:
            index, (request_id, p) = pending[0]
            params = dataclasses.replace(sampling, seed=(first_seed + index) % 2**32)
            try:
                engine.add_request(request_id, list(prompts[p]), params)
            except QueueFull:
                break
            pending.pop(0)
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [Rollout(p, tuple(int(t) for t in prompts[p]), tuple(tokens[request_id]), reasons[request_id])
            for request_id, p in requests]


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
