"""The serving engine against plain `generate`: greedy and seeded sampled outputs token for token for prompts
of different lengths arriving at different steps (roomy pool, and a pool so small that requests are
preempted, by recompute and by swapping to host memory), EOS / stop ids / max_tokens, prefix caching
(fewer new blocks, same output), aborts freeing their blocks, FCFS admission, static batching, no
compilation after warm-up across a random workload, allocator invariants under a few hundred random
requests with aborts, and every bad input's error."""

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer.engine import TRACES, Engine, EngineConfig, EngineError, QueueFull, SamplingParams, fit_prefill, \
    resolve_config
from llmjax.infer.generate import generate
from llmjax.infer.sampling import SamplingConfig
from llmjax.model import init_params

BLOCK_SIZE = 4
ROOMY = dict(num_blocks=64, block_size=BLOCK_SIZE, max_running=4, max_tokens_per_step=16, max_prefill_rows=2)
TINY = dict(ROOMY, num_blocks=12)  # 48 slots for 4 rows of up to 39 tokens: preemption


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("llama-tiny")
    return init_params(cfg, jax.random.key(0)), cfg


@pytest.fixture(scope="module")
def prompts(tiny):
    rng = np.random.default_rng(0)
    return [rng.integers(0, tiny[1].vocab_size, n).tolist() for n in (1, 5, 13, 30, 8, 21, 4)]


def reference(params, cfg, prompts, max_new, sampling=None, eos_id=None):
    """generate()'s tokens for the prompts (one left-padded batch: padding changes no result)."""
    sampling = sampling or SamplingConfig.greedy()
    return generate(params, cfg, prompts, max_new_tokens=max_new, sampling=sampling, eos_id=eos_id).tokens


def serve(engine, requests, arrive_every=2, check=True):
    """Feed requests {id: (prompt, SamplingParams)} one every `arrive_every` steps (the first three at once);
    run to the end. Returns ({id: tokens}, {id: finish_reason}), checking the allocator after every step."""
    pending = list(requests.items())
    tokens, reasons = {}, {}
    for request_id, (prompt, params) in pending[:3]:
        engine.add_request(request_id, prompt, params)
    pending, step = pending[3:], 0
    while engine.has_unfinished() or pending:
        step += 1
        if pending and step % arrive_every == 0:
            request_id, (prompt, params) = pending.pop(0)
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.num_generated == len(tokens[out.request_id])
            if out.finished:
                assert out.request_id not in reasons, "a request finished twice"
                reasons[out.request_id] = out.finish_reason
        if check:
            engine.manager.check()
    assert engine.manager.allocator.num_used == 0 and engine.stats().num_running == 0
    return tokens, reasons


@pytest.mark.parametrize("pool,preemption", [(ROOMY, "recompute"), (TINY, "recompute"), (TINY, "swap")])
def test_greedy_equals_generate(tiny, prompts, pool, preemption):
    params, cfg = tiny
    new = 9
    want = reference(params, cfg, prompts, new)
    engine = Engine(params, cfg, EngineConfig(**pool, preemption=preemption))
    got, reasons = serve(engine, {str(i): (p, SamplingParams(max_tokens=new)) for i, p in enumerate(prompts)})
    assert [got[str(i)] for i in range(len(prompts))] == want
    assert set(reasons.values()) == {"length"}
    stats = engine.stats()
    assert stats.generated_tokens_total == new * len(prompts)
    assert stats.prompt_tokens_total == sum(map(len, prompts))
    if pool is TINY:
        assert stats.preemptions_total > 0
        assert (engine.swap_outs_total > 0) == (preemption == "swap")


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preempted_in_the_middle_of_a_chunked_prefill(tiny, preemption):
    """A newer request still prefilling (one token a step) is preempted when the older one's next block is
    missing; it resumes (its computed blocks copied back, or recomputed) and both equal generate."""
    params, cfg = tiny
    rng = np.random.default_rng(4)
    old, new = rng.integers(0, cfg.vocab_size, 4).tolist(), rng.integers(0, cfg.vocab_size, 24).tolist()
    want = reference(params, cfg, [old, new], 30)
    engine = Engine(params, cfg, EngineConfig(num_blocks=12, block_size=BLOCK_SIZE, max_running=2,
                                              max_tokens_per_step=2, max_prefill_rows=1, preemption=preemption))
    engine.add_request("old", old, SamplingParams(max_tokens=30))
    engine.add_request("new", new, SamplingParams(max_tokens=5))
    got, caught = {}, None
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        request = engine.requests.get("new")
        if request is not None and request.preempted and caught is None:
            caught = (request.state, request.computed)
        engine.manager.check()
    assert got == {"old": want[0], "new": want[1][:5]}
    if preemption == "swap":
        assert caught[0] == "swapped" and 0 < caught[1] < len(new)  # swapped out part-way through its prompt
    else:
        assert caught == ("waiting", 0)
    assert engine.manager.allocator.num_used == 0


def test_eos_and_stop_ids_end_requests_like_generate(tiny, prompts):
    params, cfg = tiny
    new = 10
    plain = reference(params, cfg, prompts, new)
    eos = plain[3][4]  # a token prompt 3 produces at its fifth step
    want = reference(params, cfg, prompts, new, eos_id=eos)
    assert len(want[3]) == 5 and want[3][-1] == eos
    stop = plain[1][2]
    engine = Engine(params, cfg, EngineConfig(**ROOMY), eos_token_id=eos)
    requests = {str(i): (p, SamplingParams(max_tokens=new)) for i, p in enumerate(prompts)}
    requests["ignore"] = (prompts[3], SamplingParams(max_tokens=new, ignore_eos=True))
    requests["stop"] = (prompts[1], SamplingParams(max_tokens=new, stop_token_ids=(stop,)))
    requests["short"] = (prompts[2], SamplingParams(max_tokens=2))
    got, reasons = serve(engine, requests)
    for i in range(len(prompts)):
        assert got[str(i)] == want[i]
        assert reasons[str(i)] == ("stop" if want[i][-1] == eos else "length")
    assert got["ignore"] == plain[3] and reasons["ignore"] == "length"
    assert got["stop"] == plain[1][: plain[1].index(stop) + 1] and reasons["stop"] == "stop"
    assert got["short"] == want[2][:2] and reasons["short"] == "length"


def test_seeded_sampling_equals_generate(tiny, prompts):
    """Per-request temperature / top-k / top-p and seeds, greedy rows in the same batches: each row's text is
    generate's with the same settings, whichever rows it shares steps with."""
    params, cfg = tiny
    new = 8
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=20, seed=11),
                dict(temperature=1.3, top_p=0.8, seed=5), dict(temperature=0.9, top_k=50, top_p=0.9, seed=7),
                dict(temperature=1.0, seed=3), dict(temperature=0.0)]
    configs = [SamplingConfig(**{"seed": 0, **s}) for s in settings]
    want = reference(params, cfg, prompts, new, sampling=configs)
    engine = Engine(params, cfg, EngineConfig(**TINY))
    got, _ = serve(engine, {str(i): (p, SamplingParams(max_tokens=new, **s))
                            for i, (p, s) in enumerate(zip(prompts, settings))})
    assert [got[str(i)] for i in range(len(prompts))] == want
    assert engine.stats().preemptions_total > 0  # the recomputed rows kept their seeds' streams


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_sync_and_async_scheduling_equal_generate(tiny, prompts, async_scheduling):
    """async_scheduling (the default) dispatches step n + 1 before reading step n's tokens back, feeding each
    row's input token on the device; off, every step() waits for its own tokens. Both give generate's tokens
    and finish reasons with EOS, sampled rows and preemption by swapping (async schedules a request that
    stopped on EOS once more and drops that token); async's first step returns no token."""
    params, cfg = tiny
    new = 10
    eos = reference(params, cfg, prompts, new)[3][4]
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=20, seed=11),
                dict(temperature=0.0), dict(temperature=0.9, top_k=50, top_p=0.9, seed=7), dict(temperature=0.0),
                dict(temperature=1.3, top_p=0.8, seed=5)]
    want = reference(params, cfg, prompts, new, sampling=[SamplingConfig(**{"seed": 0, **s}) for s in settings],
                     eos_id=eos)
    assert len(want[3]) == 5
    engine = Engine(params, cfg, EngineConfig(**TINY, preemption="swap", async_scheduling=async_scheduling),
                    eos_token_id=eos)
    engine.add_request("first", prompts[0], SamplingParams(max_tokens=2))
    first = [token for out in engine.step() for token in out.new_token_ids]
    assert (first == []) == async_scheduling
    while engine.has_unfinished():
        engine.step()
    got, reasons = serve(engine, {str(i): (p, SamplingParams(max_tokens=new, **s))
                                  for i, (p, s) in enumerate(zip(prompts, settings))})
    assert [got[str(i)] for i in range(len(prompts))] == want
    assert [reasons[str(i)] for i in range(len(prompts))] == ["stop" if w[-1] == eos else "length" for w in want]
    assert engine.swap_outs_total > 0 and engine.stats().generated_tokens_total >= sum(map(len, want))


def test_prefix_caching_reuses_blocks_and_keeps_outputs(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(1)
    system = rng.integers(0, cfg.vocab_size, 22).tolist()  # five full blocks of four, and two tokens
    a, b, c = (system + rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 6, 1))
    want = reference(params, cfg, [a, b, c], 6)
    engine = Engine(params, cfg, EngineConfig(**ROOMY))
    allocated = []
    allocate = engine.manager.allocator.allocate
    engine.manager.allocator.allocate = lambda: allocated.append(1) or allocate()

    def run(request_id, prompt):
        before = len(allocated)
        out, _ = serve(engine, {request_id: (prompt, SamplingParams(max_tokens=6))})
        return out[request_id], len(allocated) - before

    first, first_blocks = run("a", a)
    second, second_blocks = run("b", b)  # a has finished: its blocks wait in the free queue, still cached
    assert (first, second) == (want[0], want[1])
    assert first_blocks == engine.manager.blocks_needed(len(a) + 5)  # the last token's K/V is never written
    assert second_blocks == engine.manager.blocks_needed(len(b) + 5) - 5
    assert engine.manager.prefix_hits == 5 * BLOCK_SIZE

    # Two live sharers: c joins while b2 still runs, and reads b2's blocks (refcount 2).
    got = {}
    engine.add_request("b2", b, SamplingParams(max_tokens=6))
    engine.add_request("c", c, SamplingParams(max_tokens=6))
    while engine.has_unfinished():
        outs = engine.step()
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        if "c" in engine.manager and "b2" in engine.manager and engine.requests["c"].num_generated:
            shared = set(engine.manager.block_table("b2")) & set(engine.manager.block_table("c"))
            assert len(shared) == 5 and all(engine.manager.allocator.refcounts[x] == 2 for x in shared)
    assert got == {"b2": want[1], "c": want[2]}
    assert engine.manager.allocator.num_used == 0


def test_update_weights_serves_the_new_model_without_its_old_prefix_cache(tiny):
    """RL's weight hand-over: after update_weights the engine answers as a fresh engine of the new weights would,
    with the same compiled programs, and no prompt block cached under the old weights is reused."""
    params, cfg = tiny
    other = init_params(cfg, jax.random.key(5))
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, cfg.vocab_size, 13).tolist()
    engine = Engine(params, cfg, EngineConfig(**ROOMY))
    before, _ = serve(engine, {"a": (prompt, SamplingParams(max_tokens=5))})
    assert before["a"] == reference(params, cfg, [prompt], 5)[0]
    traces = dict(TRACES)
    engine.update_weights(other)
    after, _ = serve(engine, {"b": (prompt, SamplingParams(max_tokens=5))})
    assert after["b"] == reference(other, cfg, [prompt], 5)[0] != before["a"]
    assert engine.manager.prefix_hits == 0 and dict(TRACES) == traces
    engine.add_request("c", prompt, SamplingParams(max_tokens=2))
    with pytest.raises(EngineError, match="idle engine"):
        engine.update_weights(params)
    engine.abort("c")
    engine.step()
    wrong = get_config("llama-tiny", d_model=32, head_dim=8)
    with pytest.raises(EngineError, match="not this model's"):
        engine.update_weights(init_params(wrong, jax.random.key(0)))
    with pytest.raises(EngineError, match="shapes or dtypes differ"):
        engine.update_weights(jax.tree.map(lambda x: x.astype("bfloat16"), engine.dparams), prepared=True)


def test_prefix_caching_off_allocates_every_block(tiny):
    params, cfg = tiny
    prompt = list(range(1, 20))
    engine = Engine(params, cfg, EngineConfig(**ROOMY, prefix_caching=False))
    serve(engine, {"a": (prompt, SamplingParams(max_tokens=3))})
    serve(engine, {"b": (prompt, SamplingParams(max_tokens=3))})
    assert engine.manager.prefix_hits == 0


def test_abort_frees_blocks_and_reports_once(tiny, prompts):
    params, cfg = tiny
    engine = Engine(params, cfg, EngineConfig(**TINY, preemption="swap"))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=14))
    swapped_seen = False
    for _ in range(12):
        engine.step()
        swapped_seen |= bool(engine.swapped)
    assert swapped_seen and engine.stats().num_running > 0
    victims = [engine.running[0].request_id, engine.waiting[-1].request_id]
    if engine.swapped:
        victims.append(engine.swapped[0].request_id)
    used = engine.manager.allocator.num_used
    engine.abort(victims[0])
    assert engine.manager.allocator.num_used < used  # freed now, not at the next step
    for victim in victims[1:]:
        engine.abort(victim)
    engine.abort("no such request")  # a no-op
    engine.manager.check()
    outs = [o for o in engine.step() if o.request_id in victims]
    assert sorted(o.request_id for o in outs) == sorted(victims)
    assert all(o.finished and o.finish_reason == "abort" and not o.new_token_ids for o in outs)
    engine.abort(victims[0])  # already finished: a no-op, not reported again
    while engine.has_unfinished():
        assert not {o.request_id for o in engine.step()} & set(victims)
        engine.manager.check()
    assert engine.manager.allocator.num_used == 0
    for request_id in [r for r in map(str, range(len(prompts))) if r not in victims]:
        engine.abort(request_id)  # finished ones: no-ops
    assert not engine.step() and not engine.has_unfinished()


def test_fcfs_admission_and_static_batching(tiny, prompts):
    """Continuous: a request joins as soon as a row frees up, oldest first. Static: a new batch only when
    the whole previous batch has finished. Both give generate's tokens."""
    params, cfg = tiny
    want = reference(params, cfg, prompts, 9)
    lengths = [2, 9, 3, 4, 6, 2, 5]  # max_tokens per request
    first_step = {}
    for scheduling in ("continuous", "static"):
        engine = Engine(params, cfg, EngineConfig(**ROOMY, scheduling=scheduling))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=lengths[i]))
        step, got, started, done_at = 0, {}, {}, {}
        while engine.has_unfinished():
            if step == 1 and scheduling == "static":  # a batch is admitted whole (4 rows) and decoded padded to 4
                assert len(engine.running) == 4 and engine._static_rows == 4
            step += 1
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                started.setdefault(out.request_id, step)
                if out.finished:
                    done_at[out.request_id] = step
        for i in range(len(prompts)):
            assert got[str(i)] == want[i][: lengths[i]]
        order = [started[str(i)] for i in range(len(prompts))]
        assert order == sorted(order)  # FCFS: nobody started before an older request
        first_step[scheduling] = order
        if scheduling == "static":  # the first batch (four rows) ends with its longest request (9 tokens)
            batch_end = max(done_at[str(i)] for i in range(4))
            assert all(started[str(i)] > batch_end for i in range(4, len(prompts)))
    assert first_step["continuous"][4] < first_step["static"][4]


def test_no_compilation_after_warmup(tiny):
    """Every program shape comes from the buckets warmup() compiled: a random workload (ragged prompts,
    chunked prefill, preemption by swapping, sampling, prefix hits) traces nothing new."""
    params, cfg = tiny
    engine = Engine(params, cfg, EngineConfig(**TINY, preemption="swap"))
    engine.warmup()
    before = dict(TRACES)
    rng = np.random.default_rng(2)
    shared = rng.integers(0, cfg.vocab_size, 12).tolist()
    requests = {}
    for i in range(24):
        prompt = rng.integers(0, cfg.vocab_size, int(rng.integers(1, 26))).tolist()
        if i % 3 == 0:
            prompt = (shared + prompt)[:26]
        params_i = SamplingParams(max_tokens=int(rng.integers(5, 21)), temperature=float(rng.choice([0, 0.8])),
                                  top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.9])),
                                  seed=int(rng.integers(100)))
        requests[str(i)] = (prompt, params_i)
    serve(engine, requests, arrive_every=1, check=False)
    assert engine.stats().preemptions_total > 0 and engine.swap_outs_total > 0
    assert dict(TRACES) == before


@pytest.mark.slow
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_random_workload_keeps_allocator_invariants(tiny, preemption):
    """A few hundred requests of random lengths arriving over time into a small pool, some aborted while
    waiting, running or swapped out: BlockManager.check() after every step, every request finishes exactly
    once with the right number of tokens, and the pool is empty at the end."""
    params, cfg = tiny
    engine = Engine(params, cfg, EngineConfig(**TINY, preemption=preemption, max_queue=400))
    rng = np.random.default_rng(3)
    shared = rng.integers(0, cfg.vocab_size, 16).tolist()
    todo, limits, reasons, counts, aborted = 300, {}, {}, {}, set()
    added = 0
    while added < todo or engine.has_unfinished():
        for _ in range(int(rng.poisson(0.7))):
            if added < todo:
                length = int(rng.integers(1, 40))
                prompt = rng.integers(0, cfg.vocab_size, length).tolist()
                if rng.random() < 0.3:
                    prompt = (shared + prompt)[:length]
                limits[str(added)] = max_tokens = int(rng.integers(1, min(24, 48 - length) + 1))  # fits the pool
                engine.add_request(str(added), prompt, SamplingParams(max_tokens=max_tokens))
                added += 1
        if engine.requests and rng.random() < 0.08:
            victim = str(rng.choice(sorted(engine.requests)))
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finished:
                assert out.request_id not in reasons
                reasons[out.request_id] = out.finish_reason
        engine.manager.check()
    assert len(reasons) == todo
    for request_id, reason in reasons.items():
        if request_id in aborted:
            assert reason == "abort"
        else:
            assert reason == "length" and counts[request_id] == limits[request_id]
    assert engine.stats().preemptions_total > 0
    assert engine.manager.allocator.num_used == 0
    assert engine.stats() == engine.stats().__class__(0, 0, 0, 0, TINY["num_blocks"], engine.prompt_tokens_total,
                                                      engine.generated_tokens_total, engine.preemptions_total)


def test_bad_requests_raise_engine_error(tiny):
    params, cfg = tiny
    engine = Engine(params, cfg, EngineConfig(**ROOMY, max_queue=2))
    bad = [
        ([], SamplingParams(), "empty prompt"),
        ([1, cfg.vocab_size], SamplingParams(), "outside the vocabulary"),
        ([-1], SamplingParams(), "outside the vocabulary"),
        (["a"], SamplingParams(), "integer token ids"),
        ([1] * 60, SamplingParams(max_tokens=5), "above the context"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(temperature=-1.0), "temperature"),
        ([1], SamplingParams(temperature=float("nan")), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_k=-2), "top_k"),
        ([1], SamplingParams(seed=-1), "seed"),
        ([1], SamplingParams(stop_token_ids=(cfg.vocab_size,)), "stop token id"),
        ([1], {"max_tokens": 3}, "SamplingParams"),
    ]
    for prompt, params_, message in bad:
        with pytest.raises(EngineError, match=message):
            engine.add_request("x", prompt, params_)
    assert not engine.has_unfinished()
    engine.add_request("a", [1, 2], SamplingParams())
    with pytest.raises(EngineError, match="already in use"):
        engine.add_request("a", [3], SamplingParams())
    engine.add_request("b", [1, 2], SamplingParams())
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.add_request("c", [1, 2], SamplingParams())
    small = Engine(params, cfg, EngineConfig(**dict(ROOMY, num_blocks=3)))
    with pytest.raises(EngineError, match="KV cache blocks"):
        small.add_request("x", [1] * 10, SamplingParams(max_tokens=5))


def test_prefill_shape_runs_the_most_chunk_tokens(tiny):
    """Default prefill shapes are the token budget's size; the scheduler's chunks go into the shape that runs
    most of them (first rows first, cut to its chunk), so a second prompt never pads the batch to the first's
    length."""
    _, cfg = tiny
    _, buckets = resolve_config(EngineConfig(max_tokens_per_step=512, max_prefill_rows=4), cfg.replace(max_seq_len=2048))
    shapes = buckets.prefill_shapes
    assert shapes == ((1, 512), (2, 256), (4, 128))
    a, b, c = "a", "b", "c"
    assert fit_prefill([(a, 284), (b, 164)], shapes) == ((2, 256), [(a, 256), (b, 164)])
    assert fit_prefill([(a, 500)], shapes) == ((1, 512), [(a, 500)])
    assert fit_prefill([(a, 400), (b, 20)], shapes) == ((1, 512), [(a, 400)])  # b waits for the next step
    assert fit_prefill([(a, 100), (b, 90), (c, 30)], shapes) == ((4, 128), [(a, 100), (b, 90), (c, 30)])
    assert fit_prefill([(a, 3)], ((1, 8), (1, 32), (4, 8), (4, 32))) == ((1, 8), [(a, 3)])  # fewest slots on a tie


@pytest.mark.parametrize("change,message", [
    (dict(preemption="evict"), "preemption"), (dict(scheduling="fifo"), "scheduling"),
    (dict(max_tokens_per_step=2), "max_tokens_per_step"), (dict(max_model_len=1000), "max_model_len"),
    (dict(batch_buckets=(1, 2)), "batch_buckets"), (dict(chunk_buckets=(4, 64)), "chunk_buckets"),
    (dict(num_blocks=0), "num_blocks"), (dict(decode_impl="cuda"), "decode attention"),
])
def test_bad_engine_config(tiny, change, message):
    params, cfg = tiny
    with pytest.raises(ValueError, match=message):
        Engine(params, cfg, EngineConfig(**{**ROOMY, **change}))
