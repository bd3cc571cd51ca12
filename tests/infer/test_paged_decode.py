"""The model over a paged KV cache equals the contiguous-cache path: greedy tokens from a paged prefill +
paged decode steps (the Pallas kernel in interpret mode) equal `generate`'s for a ragged batch with an
empty batch slot, a forked sequence that diverges from its parent inside a shared block (copy-on-write),
and a prompt whose first blocks come from the prefix cache (only its suffix is computed)."""

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer.decode_model import prepare_params
from llmjax.infer.generate import generate
from llmjax.infer.paged import BlockManager, copy_blocks_jit, decode_step_paged_jit, init_paged_cache, \
    pad_copies, prefill_paged_jit
from llmjax.infer.sampling import SamplingConfig
from llmjax.model import forward, init_params

BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS, ROWS, CHUNK, NEW = 4, 24, 6, 4, 12, 6


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("llama-tiny")
    return init_params(cfg, jax.random.key(0)), cfg


def contiguous(params, cfg, prompts, n):
    return generate(params, cfg, prompts, max_new_tokens=n, sampling=SamplingConfig(temperature=0.0)).tokens


class PagedRunner:
    """A minimal host loop (what the engine will do): rows of a fixed-size batch, one compiled shape each."""

    def __init__(self, params, cfg, impl):
        self.cfg, self.impl = cfg, impl
        self.dparams = prepare_params(params, cfg)
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.cache = init_paged_cache(cfg, NUM_BLOCKS, BLOCK_SIZE)
        self.rows = [None] * ROWS  # seq id per batch slot
        self.out, self.last, self.logits = {}, {}, {}

    def argmax(self, logits):
        self.step_logits = np.asarray(logits)[:, : self.cfg.vocab_size]
        return self.step_logits.argmax(-1)

    def prefill(self, seqs: dict):
        """Add sequences {id: prompt} to free rows and prefill what the prefix cache does not hold."""
        tokens = np.zeros((ROWS, CHUNK), np.int32)
        context, chunk = np.zeros(ROWS, np.int32), np.zeros(ROWS, np.int32)
        cached = {}
        for seq_id, prompt in seqs.items():
            row = self.rows.index(None)
            self.rows[row] = seq_id
            cached[seq_id] = hit = self.manager.add_sequence(seq_id, prompt)
            rest = prompt[hit:]
            tokens[row, : len(rest)], context[row], chunk[row] = rest, hit, len(rest)
        tables = self.manager.block_tables(self.rows, MAX_BLOCKS)
        logits, self.cache = prefill_paged_jit(self.dparams, tokens, self.cache, tables, context, chunk, self.cfg)
        picked = self.argmax(logits)
        for row, seq_id in enumerate(self.rows):
            if seq_id in seqs:
                self.manager.commit(seq_id, seqs[seq_id][cached[seq_id]:])
                self.out[seq_id], self.last[seq_id] = [int(picked[row])], int(picked[row])
                self.logits[seq_id] = [self.step_logits[row]]
        return cached

    def fork(self, parent, child, first_token):
        """The child continues the parent's prompt with first_token instead of the parent's choice."""
        self.manager.fork(parent, child)
        self.rows[self.rows.index(None)] = child
        self.out[child], self.last[child] = [first_token], first_token
        self.logits[child] = []

    def step(self):
        copies = []
        for seq_id in self.rows:
            if seq_id is not None:
                copies += self.manager.reserve(seq_id, 1)
        if copies:
            self.cache = copy_blocks_jit(self.cache, pad_copies(copies, ROWS))
        tables = self.manager.block_tables(self.rows, MAX_BLOCKS)
        lengths = np.array([-1 if s is None else self.manager.length(s) for s in self.rows], np.int32)
        last = np.array([0 if s is None else self.last[s] for s in self.rows], np.int32)
        logits, self.cache = decode_step_paged_jit(self.dparams, last, self.cache, tables, lengths, self.cfg,
                                                   impl=self.impl)
        picked = self.argmax(logits)
        for row, seq_id in enumerate(self.rows):
            if seq_id is not None:
                self.manager.commit(seq_id, [self.last[seq_id]])
                self.out[seq_id].append(int(picked[row]))
                self.logits[seq_id].append(self.step_logits[row])
                self.last[seq_id] = int(picked[row])
        self.manager.check()
        return copies

    def check_logits(self, params, seq_id, prompt):
        """Every step's logits equal the full forward's over the prompt and the tokens chosen so far."""
        tokens = prompt + self.out[seq_id]
        full = np.asarray(forward(params, np.array([tokens[:-1]]), self.cfg))[0, :, : self.cfg.vocab_size]
        got = np.stack(self.logits[seq_id])
        np.testing.assert_allclose(got, full[len(full) - len(got):], atol=2e-4, rtol=2e-4)

    def free(self, seq_id):
        self.manager.free(seq_id)
        self.rows[self.rows.index(seq_id)] = None


@pytest.mark.parametrize("impl,sliding_window", [("pallas", None), ("xla", 5)])
def test_paged_greedy_equals_contiguous(tiny, impl, sliding_window):
    """impl "pallas": the paged kernel (interpret mode); "xla" with a window of 5: the gathering reference
    and a sliding-window model (the contiguous path keeps a 5-slot ring, the paged one masks)."""
    params, cfg = tiny
    cfg = cfg.replace(sliding_window=sliding_window)
    a = [5, 17, 3, 9, 100, 7, 8]          # 7 tokens: its last block is partly full when forked
    b = [1]                               # one token
    c = [200, 4, 4, 6, 2, 11, 12, 13]     # exactly two blocks
    runner = PagedRunner(params, cfg, impl)
    assert runner.prefill({"a": a, "b": b, "c": c}) == {"a": 0, "b": 0, "c": 0}
    forked_token = (runner.last["a"] + 1) % cfg.vocab_size
    runner.fork("a", "a2", forked_token)   # all four rows busy now
    copies = runner.step()
    assert len(copies) == 1               # a's third block, shared with a2, copied before the first write
    for _ in range(NEW - 2):
        runner.step()

    want = contiguous(params, cfg, [a, b, c, a + [forked_token]], NEW)
    assert runner.out["a"] == want[0]
    assert runner.out["b"] == want[1]
    assert runner.out["c"] == want[2]
    assert runner.out["a2"] == [forked_token] + want[3][: NEW - 1]
    for seq_id, prompt in (("a", a), ("b", b), ("c", c), ("a2", a)):
        runner.check_logits(params, seq_id, prompt)

    # A prompt starting with c's two full blocks: served from the prefix cache after c is freed.
    runner.free("c")
    runner.free("b")
    d = c + [33, 44, 55]
    assert runner.prefill({"d": d}) == {"d": 8}
    for _ in range(NEW - 1):
        runner.step()
    assert runner.out["d"] == contiguous(params, cfg, [d], NEW)[0]
    runner.check_logits(params, "d", d)
    for seq_id in ("a", "a2", "d"):
        runner.free(seq_id)
    runner.manager.check()
    assert runner.manager.allocator.num_free == NUM_BLOCKS


def test_flash_prefill_equals_the_gathering_prefill():
    """prefill_impl "flash" (the flash kernel over end-aligned gathered K/V, interpret mode here) gives the
    gathering prefill's logits and cache, chunk after chunk, next to an empty row."""
    cfg = get_config("llama-tiny").replace(d_model=64, num_heads=4, num_kv_heads=2, head_dim=16)
    params = init_params(cfg, jax.random.key(1))
    dparams = prepare_params(params, cfg)
    manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    caches = {impl: init_paged_cache(cfg, NUM_BLOCKS, BLOCK_SIZE) for impl in ("xla", "flash")}
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
    manager.add_sequence("x", prompt)
    tables = manager.block_tables(["x", None], MAX_BLOCKS)
    for start, stop in ((0, 5), (5, 13)):
        tokens = np.zeros((2, CHUNK), np.int32)
        tokens[0, : stop - start] = prompt[start:stop]
        logits = {}
        for impl in caches:
            logits[impl], caches[impl] = prefill_paged_jit(dparams, tokens, caches[impl], tables,
                                                           np.array([start, 0], np.int32),
                                                           np.array([stop - start, 0], np.int32), cfg, impl)
        np.testing.assert_allclose(np.asarray(logits["flash"])[0], np.asarray(logits["xla"])[0], atol=1e-4, rtol=1e-4)
        manager.commit("x", prompt[start:stop])
    for a, b in zip(jax.tree.leaves(caches["flash"]), jax.tree.leaves(caches["xla"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_pass(tiny):
    """A prompt prefilled in pieces (each after the stored ones, next to a row that has nothing to do)
    gives the full forward's logits: the paged prefill is a chunked prefill."""
    params, cfg = tiny
    dparams = prepare_params(params, cfg)
    manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    cache = init_paged_cache(cfg, NUM_BLOCKS, BLOCK_SIZE)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
    assert manager.add_sequence("x", prompt) == 0
    tables = manager.block_tables(["x", None], MAX_BLOCKS)
    for start, stop in ((0, 5), (5, 6), (6, 13)):
        tokens = np.zeros((2, CHUNK), np.int32)
        tokens[0, : stop - start] = prompt[start:stop]
        logits, cache = prefill_paged_jit(dparams, tokens, cache, tables, np.array([start, 0], np.int32),
                                          np.array([stop - start, 0], np.int32), cfg)
        manager.commit("x", prompt[start:stop])
        want = np.asarray(forward(params, np.array([prompt[:stop]]), cfg))[0, -1, : cfg.vocab_size]
        np.testing.assert_allclose(np.asarray(logits)[0, : cfg.vocab_size], want, atol=2e-4, rtol=2e-4)
