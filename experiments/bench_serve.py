"""Serving under Poisson load: static vs continuous batching (+ prefix caching); throughput, TTFT / ITL, KV use; in process or over HTTP."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from llmjax.io.models import GGUF_HELP

MODES = ("static", "continuous", "prefix")
MODE_TITLES = {"static": "static batching", "continuous": "continuous batching",
               "prefix": "continuous + prefix caching", "http": "HTTP server", "static-sync": "static, sync scheduling",
               "continuous-sync": "continuous, sync scheduling", "prefix-sync": "prefix caching, sync scheduling"}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_serve",
        description="A seeded load generator: requests arrive as a Poisson process at each --rates value (inf: all at "
        "once, the offline case), with prompt and output lengths drawn from clipped log-normal distributions (a "
        "ShareGPT-like long tail) and prompts that start with one of --system-prompts shared system prompts. Every "
        "rate is run in process against llmjax.infer.engine in each --modes: 'static' (a batch of up to "
        "--max-running requests is admitted only when the previous batch has wholly finished, as a server "
        "without iteration-level scheduling does; prefix caching off), 'continuous' (requests join and leave the "
        "batch between steps; prefix caching off) and 'prefix' (continuous, prefix caching on). With --http URL "
        "the same load goes to an OpenAI-compatible server's streamed /v1/completions instead, timed on the "
        "client. With --gguf the model is a real one and so are the prompts: default-corpus text as the system and user "
        "turns, rendered through the model's chat template and encoded with its tokenizer (the lengths drawn as "
        "above). Reports output tokens/s, requests/s, time to first token (TTFT), inter-token latency (ITL), "
        "end-to-end and per-token latency percentiles, KV pool utilization against a contiguous cache's for the "
        "same requests, and preemptions. Prints a table, writes JSON and PNG charts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="llama-1b",
                        help="model preset with random weights (compute dtype of the preset)")
    source.add_argument("--ckpt", type=Path, default=None,
                        help="a run folder written by `experiments train` (its newest checkpoint)")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", default=None,
                        help=GGUF_HELP + "; prompts are real text through its chat template (with --http: the "
                        "workload only, for a server of the same model, e.g. `experiments serve --gguf`)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="--gguf: the weights' and computation's dtype")
    p.add_argument("--http", default=None, metavar="URL",
                   help="benchmark a running OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000) instead of "
                   "the engine in process; --modes, the engine flags and the model flags are then ignored, the server "
                   "must accept token-id prompts, and --vocab-size (or --gguf) / --max-model-len must fit its model")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--rates", default="inf,24,12", help="request rates (requests/s, Poisson), 'inf' = all at t=0")
    p.add_argument("--num-requests", type=int, default=768, help="requests of the offline (rate inf) runs")
    p.add_argument("--arrival-window", type=float, default=8.0,
                   help="seconds of arrivals at a finite rate: its runs take the first rate x window requests "
                   "(at most --num-requests)")
    p.add_argument("--prompt-median", type=float, default=96,
                   help="median of the prompt length after the system prompt (tokens)")
    p.add_argument("--prompt-sigma", type=float, default=0.8, help="log-normal sigma of that length")
    p.add_argument("--output-median", type=float, default=128, help="median output length (tokens, EOS ignored)")
    p.add_argument("--output-sigma", type=float, default=0.9, help="log-normal sigma of the output length")
    p.add_argument("--max-prompt", type=int, default=1024, help="prompts are clipped to this many tokens")
    p.add_argument("--max-output", type=int, default=1024, help="outputs are clipped to this many tokens")
    p.add_argument("--system-prompts", type=int, default=4, help="distinct shared system prompts (0: none)")
    p.add_argument("--system-len", type=int, default=192, help="tokens of each system prompt")
    p.add_argument("--max-model-len", type=int, default=2048, help="context per request (<= the model's)")
    p.add_argument("--num-blocks", type=int, default=8192, help="KV pool blocks")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--max-running", type=int, default=64, help="rows decoded together (and static batch size)")
    p.add_argument("--max-tokens-per-step", type=int, default=512, help="engine token budget per step")
    p.add_argument("--max-prefill-rows", type=int, default=4, help="prompts prefilled in one step")
    p.add_argument("--batch-buckets", default="16,64", help="decode batch sizes compiled (largest >= --max-running)")
    p.add_argument("--prefill-row-buckets", default="",
                   help="prefill row counts compiled (with --chunk-buckets: every pair); default: shapes (r, token "
                   "budget / r) for r = 1, 2, 4 .. --max-prefill-rows")
    p.add_argument("--chunk-buckets", default="", help="prefill chunk lengths compiled (<= the token budget)")
    p.add_argument("--table-width-buckets", default="32,128",
                   help="block-table widths compiled, in blocks (largest >= max-model-len / block-size; the Pallas "
                   "decode kernel uses the largest only)")
    p.add_argument("--preemption", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--prefill-impl", default="auto", choices=["auto", "flash", "xla"],
                   help="paged prefill attention: the flash kernel, or the gathering reference (auto: flash on GPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (and of --model's weights)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds; runs that would start after this much time since the start are skipped")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--http: the server model's vocabulary (token ids drawn below it)")
    p.add_argument("--kv-every", type=int, default=16, help="steps between samples of the KV utilization")
    p.add_argument("--compare-sync", default="",
                   help="comma-separated modes also run with the engine's async scheduling off (each step waits for "
                   "its own tokens), at the first rate only, right after that rate's runs: the overlap's before / after")
    p.add_argument("--check-outputs", type=int, default=0, metavar="N",
                   help="first check that the engine's greedy tokens (async and sync scheduling) equal `generate`'s "
                   "for the first N prompts of the workload (--check-tokens each), and report where they differ "
                   "with the logit gap there (bf16 near-ties)")
    p.add_argument("--check-tokens", type=int, default=48, help="tokens generated per prompt by --check-outputs")
    p.add_argument("--check-dtypes", default="", help="comma-separated compute dtypes --check-outputs runs in "
                   "(default: the model's)")
    p.add_argument("--program-times", type=int, default=0, metavar="REPEATS",
                   help="first time each compiled program alone (median of REPEATS calls): decode at every batch "
                   "bucket, prefill at every shape and table width, and prefill with attention left out (its share)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (draw it later with --replot)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only print the table of an earlier run's JSON and draw its PNG next to it")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "bench_serve.json")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _rates(text: str) -> list[float]:
    return [float("inf") if v.strip() == "inf" else float(v) for v in text.split(",") if v.strip()]


# --- the workload ---------------------------------------------------------------------------------------

@dataclass
class Request:
    request_id: str
    arrival_unit: float  # arrival time at rate 1 (scaled by 1 / rate)
    prompt: list[int]
    max_tokens: int


def make_workload(args, vocab_size: int, max_model_len: int, chat: ChatText | None = None) -> list[Request]:
    """Seeded requests: Poisson arrival gaps (rate 1), log-normal prompt / output lengths clipped to the
    context, prompts = one of the shared system prompts + a user part: random token ids, or with `chat` spans of
    real text rendered as system and user turns through the chat template."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    limit = min(args.max_prompt, max_model_len - 1)

    def piece(length: int) -> list[int]:
        if chat is None:
            return rng.integers(0, vocab_size, length).tolist()
        start = int(rng.integers(0, max(1, len(chat.pool) - length)))
        return chat.pool[start: start + length].tolist()

    systems = [piece(args.system_len) for _ in range(args.system_prompts)]
    arrivals = np.cumsum(rng.exponential(1.0, args.num_requests))
    arrivals -= arrivals[0]
    requests = []
    for i in range(args.num_requests):
        system = systems[rng.integers(len(systems))] if systems else []
        user = int(np.clip(round(rng.lognormal(math.log(args.prompt_median), args.prompt_sigma)), 1, args.max_prompt))
        if chat is None:
            prompt = (system + piece(user))[:limit]
        else:
            prompt = chat.prompt(system, piece(user), limit)
        room = max_model_len - len(prompt)
        output = int(np.clip(round(rng.lognormal(math.log(args.output_median), args.output_sigma)), 1,
                             min(args.max_output, room)))
        requests.append(Request(f"r{i}", float(arrivals[i]), prompt, output))
    return requests


@dataclass
class ChatText:
    """Real prompts for a real model: its tokenizer and chat template, and a pool of text as token ids (held-out
    default-corpus files) that system and user turns are cut from."""

    tokenizer: object
    chat_format: object
    pool: object  # int32 [tokens]

    @classmethod
    def of(cls, tokenizer, chat_format, pool_tokens: int = 100_000) -> ChatText:
        from llmjax.experiments.finetune_lora import corpus_tokens

        return cls(tokenizer, chat_format, corpus_tokens(tokenizer, "validation", pool_tokens))

    def prompt(self, system: list[int], user: list[int], limit: int) -> list[int]:
        """The system turn (when given) and the user turn as text, rendered and encoded; the user text is cut until
        the prompt fits `limit` tokens."""
        head = [{"role": "system", "content": self.tokenizer.decode(system)}] if system else []
        while True:
            text = self.chat_format.render(head + [{"role": "user", "content": self.tokenizer.decode(user)}])
            ids = self.tokenizer.encode_prompt(text)
            if len(ids) <= limit or not user:
                return ids[:limit]
            user = user[: max(0, len(user) - (len(ids) - limit))]


def requests_at(requests: list[Request], rate: float, args) -> list[Request]:
    """All requests offline (rate inf); at a finite rate, those arriving within --arrival-window seconds."""
    if math.isinf(rate):
        return requests
    return requests[: max(1, min(len(requests), round(rate * args.arrival_window)))]


# --- figures -----------------------------------------------------------------------------------------

def percentiles(values) -> dict:
    import numpy as np

    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    values = np.asarray(values, float)
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean())}


def summarize(requests: list[Request], arrivals: dict, token_times: dict, counts: dict) -> dict:
    """Throughput and latency figures from each request's arrival and token times (seconds from the start)."""
    done = [r for r in requests if token_times.get(r.request_id)]
    end = max(token_times[r.request_id][-1] for r in done) if done else 0.0
    duration = end - min(arrivals.values()) if done else float("nan")
    ttft, itl, e2e, per_token = [], [], [], []
    for r in done:
        times, arrival = token_times[r.request_id], arrivals[r.request_id]
        ttft.append(times[0] - arrival)
        itl.extend(b - a for a, b in zip(times, times[1:]))
        e2e.append(times[-1] - arrival)
        per_token.append((times[-1] - arrival) / max(1, counts[r.request_id]))
    tokens = sum(counts.get(r.request_id, 0) for r in requests)
    return {"requests": len(requests), "completed": len(done), "output_tokens": tokens,
            "prompt_tokens": sum(len(r.prompt) for r in requests), "duration_s": duration,
            "output_tokens_per_s": tokens / duration if done else 0.0,
            "requests_per_s": len(done) / duration if done else 0.0,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "latency_s": percentiles(e2e),
            "latency_per_token_s": percentiles(per_token)}


# --- in process -------------------------------------------------------------------------------------

def engine_config(args, mode: str, async_scheduling: bool = True):
    from llmjax.infer.engine import EngineConfig

    return EngineConfig(async_scheduling=async_scheduling, num_blocks=args.num_blocks, block_size=args.block_size, max_running=args.max_running,
                        max_tokens_per_step=args.max_tokens_per_step, max_queue=max(args.num_requests, 1),
                        prefix_caching=mode == "prefix", preemption=args.preemption,
                        scheduling="static" if mode == "static" else "continuous", max_model_len=args.max_model_len,
                        max_prefill_rows=args.max_prefill_rows, batch_buckets=_ints(args.batch_buckets),
                        prefill_row_buckets=_ints(args.prefill_row_buckets), chunk_buckets=_ints(args.chunk_buckets),
                        table_width_buckets=_ints(args.table_width_buckets), prefill_impl=args.prefill_impl)


def run_engine(engine, requests: list[Request], rate: float, kv_every: int = 16) -> dict:
    """Feed requests at their arrival times (wall clock), step the engine until all finish (the KV utilization
    sampled every kv_every steps: it walks every block table)."""
    from llmjax.infer.engine import SamplingParams

    arrival = {r.request_id: (0.0 if math.isinf(rate) else r.arrival_unit / rate) for r in requests}
    order = sorted(requests, key=lambda r: arrival[r.request_id])
    token_times = {r.request_id: [] for r in requests}
    counts = {r.request_id: 0 for r in requests}
    util = {"paged": 0.0, "contiguous": 0.0, "contiguous_reserved": 0.0, "steps": 0}
    peak_blocks, steps, busy = 0, 0, 0.0
    preemptions_before = engine.stats().preemptions_total
    host_before = dict(engine.host_seconds)
    start, next_index = time.perf_counter(), 0
    while next_index < len(order) or engine.has_unfinished():
        now = time.perf_counter() - start
        while next_index < len(order) and arrival[order[next_index].request_id] <= now:
            r = order[next_index]
            engine.add_request(r.request_id, r.prompt, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
            next_index += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrival[order[next_index].request_id] - now))
            continue
        step_start = time.perf_counter()
        outputs = engine.step()
        stamp = time.perf_counter() - start
        busy += time.perf_counter() - step_start
        steps += 1
        for out in outputs:
            token_times[out.request_id].extend([stamp] * len(out.new_token_ids))
            counts[out.request_id] += len(out.new_token_ids)
        if engine.running and steps % kv_every == 0:
            figures = engine.kv_utilization()
            for key in ("paged", "contiguous", "contiguous_reserved"):
                util[key] += figures[key]
            util["steps"] += 1
            peak_blocks = max(peak_blocks, engine.manager.allocator.num_used)
    result = summarize(requests, arrival, token_times, counts)
    measured = max(1, util.pop("steps"))
    result.update(kv_utilization={key: value / measured for key, value in util.items()},
                  peak_blocks_used=peak_blocks, blocks_total=engine.config.num_blocks,
                  preemptions=engine.stats().preemptions_total - preemptions_before, steps=steps,
                  step_ms=1e3 * busy / max(1, steps),
                  step_phase_ms={phase: 1e3 * (seconds - host_before.get(phase, 0.0)) / max(1, steps)
                                 for phase, seconds in engine.host_seconds.items()},
                  prefix_hit_rate=engine.manager.prefix_hits / max(1, engine.manager.prefix_queries))
    return result


def check_outputs(params, cfg, args, requests: list[Request]) -> dict:
    """The engine's greedy tokens (async and sync scheduling, continuous) against `generate`'s (one left-padded
    batch) for the first --check-outputs prompts, in each of --check-dtypes; at each first difference, the two
    tokens' logits by the model's own forward pass on the common prefix (a near-tie in the compute dtype, or a
    bug)."""
    def in_dtype(dtype):  # cuDNN attention (generate's prefill on GPUs) takes no float32: the jnp one then
        return cfg.replace(compute_dtype=dtype, **({"attention_impl": "xla"} if dtype == "float32" else {}))

    report = {}
    for dtype in args.check_dtypes.split(",") if args.check_dtypes else [cfg.compute_dtype]:
        try:
            report[dtype] = check_outputs_in(params, in_dtype(dtype), args, requests)
        except Exception as error:  # noqa: BLE001 (a check that cannot run here is reported; the benchmark goes on)
            report[dtype] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            print(f"check ({dtype}): {report[dtype]}")
    return report


def check_outputs_in(params, cfg, args, requests: list[Request]) -> dict:
    import jax
    import numpy as np

    from llmjax.infer.engine import Engine, SamplingParams
    from llmjax.infer.generate import generate
    from llmjax.model.transformer import forward

    prompts = [r.prompt for r in requests[: args.check_outputs]]
    count = args.check_tokens
    want = generate(params, cfg, prompts, max_new_tokens=count).tokens
    report = {"prompts": len(prompts), "tokens_each": count}
    longest = max(map(len, prompts)) + count
    logits_at = jax.jit(lambda params, tokens, index: forward(params, tokens, cfg)[0, index])
    for label, overlap in (("async", True), ("sync", False)):
        engine = Engine(params, cfg, engine_config(args, "continuous", async_scheduling=overlap))
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=count, ignore_eos=True))
        got: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
        del engine
        differ = []
        for i, prompt in enumerate(prompts):
            mine, theirs = got[str(i)], want[i]
            if mine == theirs:
                continue
            at = next(k for k in range(count) if mine[k] != theirs[k])
            prefix = prompt + theirs[:at]
            tokens = np.zeros((1, longest), np.int32)
            tokens[0, : len(prefix)] = prefix
            logits = np.asarray(logits_at(params, tokens, len(prefix) - 1), np.float32)[: cfg.vocab_size]
            order = np.argsort(-logits)
            differ.append({"prompt": i, "position": at, "engine_token": mine[at], "generate_token": theirs[at],
                           "logit_gap": float(abs(logits[mine[at]] - logits[theirs[at]])),
                           "ranks": [int(np.flatnonzero(order == t)[0]) for t in (mine[at], theirs[at])],
                           "top_logit": float(logits[order[0]]),
                           "top2_gap": float(logits[order[0]] - logits[order[1]])})
        report[label] = {"equal": len(prompts) - len(differ), "differ": differ}
        print(f"check ({cfg.compute_dtype}, {label} scheduling): {len(prompts) - len(differ)} of {len(prompts)} prompts equal generate "
              f"for {count} tokens; differences: {differ}")
    return report


def program_times(params, cfg, args, repeats: int) -> dict:
    """Each compiled program alone on synthetic rows: decode at every batch bucket (rows of ~400 cached tokens),
    prefill at every shape and table width (chunks after 192 stored tokens where the width allows) with each
    attention impl that runs here, prefill with attention left out (the identity: its share), and the sampling
    program. Per program, in ms: "call" (the median time until the call returns: the host's dispatch, if the
    call does not wait for the device), "alone" (median of calls each waited for) and "pipelined" (repeats
    calls back to back, then one wait, per call: the device's time when dispatch overlaps it). An impl that
    fails is reported, not raised."""
    import jax
    import numpy as np

    from llmjax.infer.engine import (
        Engine,
        decode_program,
        prefill_program,
        sample_program,
    )
    from llmjax.infer.paged import _paged_forward, resolve_prefill_impl

    engine = Engine(params, cfg, engine_config(args, "continuous"))
    block_size, buckets = engine.config.block_size, engine.buckets
    rng = np.random.default_rng(0)
    blocks = lambda rows, width: rng.integers(0, engine.config.num_blocks, (rows, width), dtype=np.int32)  # noqa: E731
    no_attention = jax.jit(
        lambda dparams, cache, tokens, tables, context, lengths: _paged_forward(
            dparams, tokens, cache, tables, context, lengths, cfg, lambda q, layer, positions, kv_lengths: q)[1],
        donate_argnums=1)

    def timed(run) -> dict:
        """run() dispatches once and stores what it must (the donated cache) on the engine; returns an array."""
        jax.block_until_ready(run())
        calls, alone = [], []
        for _ in range(repeats):
            tick = time.perf_counter()
            out = run()
            calls.append(time.perf_counter() - tick)
            jax.block_until_ready(out)
            alone.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        for _ in range(repeats):
            out = run()
        jax.block_until_ready(out)
        pipelined = (time.perf_counter() - tick) / repeats
        return {"call": 1e3 * float(np.median(calls)), "alone": 1e3 * float(np.median(alone)),
                "pipelined": 1e3 * pipelined}

    def program(fn, *args, **kwargs):
        def run():
            *out, engine.cache, engine._slot_tokens = fn(engine.dparams, engine.cache, engine._slot_tokens, *args,
                                                         **kwargs)
            return engine._slot_tokens
        return run

    def without_attention(*args):
        def run():
            engine.cache = no_attention(engine.dparams, engine.cache, *args)
            return engine.cache
        return run

    result = {}
    width = buckets.table_width[-1]
    for rows in buckets.batch:
        tables = blocks(rows, width)
        lengths = np.full(rows, min(400, width * block_size - 1), np.int32)
        zeros, slots = np.zeros(rows, np.int32), np.arange(rows, dtype=np.int32) % engine.config.max_running
        result[f"decode [{rows}] x {lengths[0]} tokens"] = timed(program(
            decode_program, zeros, np.ones(rows, bool), slots, tables, lengths, cfg=cfg, impl=engine.impl))
    logits = jax.numpy.asarray(rng.standard_normal((rows, cfg.padded_vocab_size)), jax.numpy.float32)
    _, sampling, _ = engine._rows([], rows, buckets.table_width)
    sampling = {**sampling, "temperature": np.full(rows, 0.8, np.float32), "top_p": np.full(rows, 0.9, np.float32)}

    def sample(sort):
        def run():
            tokens, engine._slot_tokens = sample_program(logits, zeros, sampling, zeros, engine._slot_tokens, slots,
                                                         sort=sort)
            return tokens
        return run

    for sort in (False, True):
        result[f"sample [{rows}]{', sort (top-k / top-p)' if sort else ''}"] = timed(sample(sort))
    for rows, chunk in buckets.prefill_shapes:
        tokens = rng.integers(0, cfg.vocab_size, (rows, chunk)).astype(np.int32)
        lengths, slots = np.full(rows, chunk, np.int32), np.arange(rows, dtype=np.int32)
        for width in buckets.table_width:
            context = np.full(rows, max(0, min(192, width * block_size - chunk)), np.int32)
            tables = blocks(rows, width)
            name = f"prefill [{rows}, {chunk}] after {context[0]}, table {width}"
            for impl in dict.fromkeys(("xla", resolve_prefill_impl("auto", cfg))):
                try:
                    result[f"{name}, {impl}"] = timed(program(prefill_program, tokens, slots, tables, context, lengths,
                                                              cfg=cfg, impl=impl))
                except Exception as error:  # noqa: BLE001 (a kernel that does not build here: say so, go on)
                    result[f"{name}, {impl}"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            if width == buckets.table_width[-1]:
                result[name + ", no attention"] = timed(without_attention(tokens, tables, context, lengths))
    for name, ms in result.items():
        print(f"  {name}: " + (", ".join(f"{k} {v:.2f}" for k, v in ms.items()) + " ms" if isinstance(ms, dict) else ms))
    del engine
    return result


def load_params(args):
    """(params, cfg, ChatText or None) of --ckpt, --gguf (real prompts) or --model (random weights)."""
    import jax

    from llmjax.config import get_config
    from llmjax.io.models import ModelLoadError, load_model, restore_params
    from llmjax.model import init_params

    if args.ckpt is not None:
        return (*restore_params(args.ckpt), None)
    if args.gguf is not None:
        try:
            model = load_model(gguf=args.gguf, dtype=args.dtype)
        except ModelLoadError as error:
            raise SystemExit(f"bench_serve: {error}") from None
        cfg = model.cfg.replace(compute_dtype=args.dtype)
        return model.params, cfg, ChatText.of(model.tokenizer, model.chat_format)
    cfg = get_config(args.model)
    return init_params(cfg, jax.random.key(args.seed)), cfg, None


def gguf_chat_text(gguf) -> ChatText:
    """--http --gguf: the file's tokenizer and chat template only (the server holds the weights)."""
    from llmjax.tokenizer.chat import ChatFormat
    from llmjax.io.gguf import GGUFError, read_metadata, resolve_gguf
    from llmjax.tokenizer.gguf import tokenizer_from_gguf

    try:
        metadata = read_metadata(resolve_gguf(gguf))
        return ChatText.of(tokenizer_from_gguf(metadata), ChatFormat.from_gguf(metadata))
    except GGUFError as error:
        raise SystemExit(f"bench_serve: {error}") from None


# --- over HTTP -----------------------------------------------------------------------------------------

async def _http_request(client, url: str, model: str, r: Request, delay: float, start: float, record: dict):
    import asyncio

    await asyncio.sleep(max(0.0, delay - (time.perf_counter() - start)))
    record["arrival"] = time.perf_counter() - start
    body = {"model": model, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    times, usage = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            record["error"] = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter() - start)
    record["times"] = times
    record["tokens"] = usage["completion_tokens"] if usage else len(times)


def run_http(url: str, requests: list[Request], rate: float) -> dict:
    """The same load against an OpenAI-compatible server: streamed completions of token-id prompts; a token
    time is a streamed chunk's arrival (a chunk may hold several tokens: whole UTF-8 characters)."""
    import asyncio

    import httpx

    url = url.rstrip("/")

    async def main():
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
            models = (await client.get(f"{url}/v1/models")).json()["data"]
            model = models[0]["id"]
            records = {r.request_id: {} for r in requests}
            start = time.perf_counter()
            delays = {r.request_id: 0.0 if math.isinf(rate) else r.arrival_unit / rate for r in requests}
            await asyncio.gather(*(_http_request(client, url, model, r, delays[r.request_id], start,
                                                 records[r.request_id]) for r in requests))
            return records

    records = asyncio.run(main())
    errors = [rec["error"] for rec in records.values() if "error" in rec]
    arrivals = {rid: rec.get("arrival", 0.0) for rid, rec in records.items()}
    token_times = {rid: rec.get("times", []) for rid, rec in records.items()}
    counts = {rid: rec.get("tokens", 0) for rid, rec in records.items()}
    result = summarize(requests, arrivals, token_times, counts)
    result.update(errors=len(errors), first_error=errors[0] if errors else None)
    return result


# --- report ------------------------------------------------------------------------------------------

def _ms(value) -> str:
    return "-" if value is None else f"{1e3 * value:,.1f}"


def print_table(rows: list[dict]) -> None:
    head = ("mode", "rate", "tok/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "latency p50 s",
            "KV paged", "KV contig", "preempt")
    lines = [head]
    for row in rows:
        r = row["result"]
        kv = r.get("kv_utilization", {})
        lines.append((row["mode"], "inf" if math.isinf(row["rate"]) else f"{row['rate']:g}",
                      f"{r['output_tokens_per_s']:,.0f}", f"{r['requests_per_s']:.2f}",
                      "/".join(_ms(r["ttft_s"][q]) for q in ("p50", "p90", "p99")),
                      "/".join(_ms(r["itl_s"][q]) for q in ("p50", "p90", "p99")),
                      "-" if r["latency_s"]["p50"] is None else f"{r['latency_s']['p50']:.2f}",
                      f"{kv['paged']:.1%}" if kv else "-", f"{kv['contiguous']:.1%}" if kv else "-",
                      str(r.get("preemptions", "-"))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for index, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def headline(rows: list[dict]) -> dict:
    """Continuous / static throughput at each rate both ran, with both p50 latencies (equal or lower is the
    claim), and the best continuous throughput whose p50 latency is within the static run's."""
    by = {(row["mode"], row["rate"]): row["result"] for row in rows}
    out = {}
    for (mode, rate), static in by.items():
        if mode not in ("static", "static-sync"):
            continue
        suffix = mode.removeprefix("static")
        for other in ("continuous" + suffix, "prefix" + suffix):
            if (other, rate) in by:
                r = by[(other, rate)]
                out[f"{other}_vs_{mode}_at_rate_{rate:g}"] = {
                    "throughput_ratio": r["output_tokens_per_s"] / max(static["output_tokens_per_s"], 1e-9),
                    "latency_p50_s": r["latency_s"]["p50"], "static_latency_p50_s": static["latency_s"]["p50"]}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({row["rate"] for row in rows if not math.isinf(row["rate"])})
    top = (max(finite) * 1.5) if finite else 1.0
    x_of = lambda rate: top if math.isinf(rate) else rate  # noqa: E731
    panels = (("output tokens/s", lambda r: r["output_tokens_per_s"]),
              ("p50 latency per output token (ms)", lambda r: 1e3 * (r["latency_per_token_s"]["p50"] or 0)),
              ("p50 TTFT (ms)", lambda r: 1e3 * (r["ttft_s"]["p50"] or 0)),
              ("p50 ITL (ms)", lambda r: 1e3 * (r["itl_s"]["p50"] or 0)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, value) in zip(axes, panels):
        for mode in dict.fromkeys(row["mode"] for row in rows):
            points = sorted((x_of(row["rate"]), value(row["result"])) for row in rows if row["mode"] == mode)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=MODE_TITLES.get(mode, mode))
        ax.set_title(title)
        ticks = finite + ([top] if any(math.isinf(row["rate"]) for row in rows) else [])
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["all"] * (len(ticks) - len(finite)))
        ax.set_xlabel("request rate (req/s; 'all': every request at t=0)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_and_plot(report: dict, out: Path, draw: bool = True) -> None:
    rows = [run for run in report["runs"] if "result" in run]
    print()
    print_table(rows)
    for name, figures in report.get("headline", {}).items():
        print(f"{name}: {figures['throughput_ratio']:.2f}x throughput, p50 latency {figures['latency_p50_s']:.2f}s "
              f"vs static {figures['static_latency_p50_s']:.2f}s")
    if rows and draw:
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        for run in report["runs"]:
            run["rate"] = float(run["rate"])
        report_and_plot(report, args.replot)
        return 0
    started = time.perf_counter()
    rates = _rates(args.rates)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    if args.http:
        chat = gguf_chat_text(args.gguf) if args.gguf is not None else None
        if args.vocab_size is None and chat is None:
            raise SystemExit("--http needs --vocab-size (token ids of the prompts are drawn below it) or --gguf")
        requests = make_workload(args, args.vocab_size or chat.tokenizer.vocab_size, args.max_model_len, chat)
        jobs = [("http", rate) for rate in rates]
    else:
        import jax

        modes = [m for m in args.modes.split(",") if m]
        unknown = (set(modes) | set(m for m in args.compare_sync.split(",") if m)) - set(MODES)
        if unknown:
            raise SystemExit(f"--modes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
        params, cfg, chat = load_params(args)
        report.update(model=cfg.name, device=str(jax.devices()[0].device_kind), dtype=cfg.compute_dtype,
                      parameters=int(sum(x.size for x in jax.tree.leaves(params))),
                      prompts="default-corpus text through the chat template" if chat else "random token ids")
        requests = make_workload(args, cfg.vocab_size, args.max_model_len, chat)
        jobs = [(mode, rate) for rate in rates for mode in modes]
        syncs = [(f"{mode}-sync", rates[0]) for mode in args.compare_sync.split(",") if mode]
        jobs[len(modes): len(modes)] = syncs  # right after the first rate's runs (before --time-budget cuts)
        if args.check_outputs:
            report["check_outputs"] = check_outputs(params, cfg, args, requests)
            args.out.write_text(json.dumps(report, indent=1))
        if args.program_times:
            report["program_ms"] = program_times(params, cfg, args, args.program_times)
            args.out.write_text(json.dumps(report, indent=1))
    report["workload"] = {"prompt_tokens": percentiles([len(r.prompt) for r in requests]),
                          "output_tokens": percentiles([r.max_tokens for r in requests])}
    print(f"{len(requests)} requests per run; prompt tokens p50 {report['workload']['prompt_tokens']['p50']:.0f}, "
          f"output tokens p50 {report['workload']['output_tokens']['p50']:.0f} / mean "
          f"{report['workload']['output_tokens']['mean']:.0f} / max {max(r.max_tokens for r in requests)}")
    warm = False
    for mode, rate in jobs:
        if time.perf_counter() - started > args.time_budget:
            print(f"skipped {mode} at rate {rate}: past --time-budget {args.time_budget:.0f}s")
            report["runs"].append({"mode": mode, "rate": rate, "skipped": "time budget"})
            continue
        if mode == "http":
            result = run_http(args.http, requests_at(requests, rate, args), rate)
        else:
            from llmjax.infer.engine import Engine

            base = mode.removesuffix("-sync")
            engine = Engine(params, cfg, engine_config(args, base, async_scheduling=base == mode))
            if not warm:
                tick = time.perf_counter()
                engine.warmup()
                report["warmup_s"] = time.perf_counter() - tick
                print(f"warm-up (every bucket compiled): {report['warmup_s']:.1f}s")
                warm = True
            result = run_engine(engine, requests_at(requests, rate, args), rate, args.kv_every)
            del engine
        report["runs"].append({"mode": mode, "rate": rate, "result": result})
        print(f"{mode:>10} rate {rate:g}: {result['output_tokens_per_s']:,.0f} tok/s, p50 latency "
              f"{result['latency_s']['p50']:.2f}s, {result['duration_s']:.1f}s run")
        args.out.write_text(json.dumps(report, indent=1))
    report["headline"] = headline([run for run in report["runs"] if "result" in run])
    report["elapsed_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    report_and_plot(report, args.out, draw=not args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
