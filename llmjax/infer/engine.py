"""A serving engine: iteration-level scheduling (Orca) with continuous batching over the paged KV cache (vLLM).

    engine = Engine(params, cfg, EngineConfig(num_blocks=1024, max_running=32), eos_token_id=0)
    engine.warmup()                                    # compile every bucket now, never while serving
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    while engine.has_unfinished():
        for out in engine.step():                      # one model iteration
            print(out.request_id, out.new_token_ids, out.finish_reason)

Every `step()` is one iteration of the whole batch: the scheduler picks, in first-come-first-served order,

1. one token for every running request that is decoding (its slot reserved in its block table; when the pool
   has no block left, the newest running request is preempted: its blocks freed and its tokens recomputed
   later (`preemption="recompute"`) or its blocks copied to host memory and back (`preemption="swap"`));
2. a chunk of the prompt of every request still prefilling (chunked prefill), within the step's token
   budget (`max_tokens_per_step`, decode tokens counted first);
3. requests that join now: swapped-out ones first, then waiting ones, while the batch, the token budget and
   the pool (a watermark of free blocks kept for decoding) have room. A prompt that starts with blocks
   already in the pool (prefix caching, `BlockManager`) only computes the rest.

Then the device runs at most three programs: copy-on-write block copies, the prefill chunks (one
[rows, chunk] batch; attention through the flash kernel on GPUs, see llmjax.infer.paged) and the decode tokens
(one [batch] step, the Pallas paged-attention kernel on GPUs); each picks its rows' greedy next tokens on the
device, and when a batch has rows with temperature > 0 a small `sample_program` draws theirs (per-request
temperature / top-k / top-p and seed, as llmjax.infer.sampling: the same seed gives the same text as
`generate`). No program holds a lax.cond: on a GPU an XLA conditional copies its predicate to the host and
waits for it, which made every dispatch wait for the device. Shapes come from small
bucket sets (decode batch sizes, prefill [rows, chunk] shapes, block-table widths; see `EngineConfig`), all
compiled by `warmup()`, so nothing compiles while serving (`TRACES` counts traces per program, for tests).

Asynchronous scheduling (`async_scheduling=True`, the default; vLLM's async scheduling): `step()` schedules and
dispatches step n + 1 before it reads step n's sampled tokens back, so the device runs one step while the host
waits for, appends and commits the previous one's tokens and schedules the next. A decoding row's input token
is then still on the device: each program also stores its sampled tokens at the request's slot of a small
device array (`keep_sampled`), where the next program reads them. Each step() returns the previous step's
tokens; a request that stops on EOS or a stop id is seen one step late (the token it was scheduled for then
is dropped; its K/V slot is written into its own, never hashed, block), while max_tokens and the context limit
are known ahead, so no step is wasted on them. Outputs equal the synchronous engine's, token for token. The
host keeps per-slot arrays (block tables, sampling settings) updated as requests join and grow, so a step
gathers its rows with one index instead of rebuilding them; `host_seconds` adds up step()'s time by phase.

`scheduling="static"` is the non-continuous baseline: a new batch is admitted only when the previous one has
finished entirely (benchmarks compare the two on the same programs).

The public interface (shared with llmjax.infer.server):

- `EngineError` (bad request: empty prompt, token id outside the vocabulary, prompt + max_tokens above the
  context, duplicate request id, bad sampling values), `QueueFull` (`max_queue` requests already waiting).
- `SamplingParams`, `RequestOutput`, `EngineConfig`, `EngineStats`.
- `Engine(params, cfg, config, eos_token_id)`: `add_request`, `abort` (frees the blocks now; the next `step()`
  reports the request once with finish_reason "abort"), `step`, `has_unfinished`, `stats`, `warmup`.
  The token that ends a request with finish_reason "stop" (EOS or a stop id) is its last new token, as in
  `generate`. Not thread-safe: drive it from one thread.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.infer.decode_model import prepare_params, resolve_decode_impl
from llmjax.infer.paged import BlockManager, PagedCacheError, PoolExhausted, copy_blocks, decode_step_paged, \
    init_paged_cache, pad_copies, prefill_paged, resolve_prefill_impl
from llmjax.infer.sampling import SamplingArrays, SamplingFeatures, filter_logits

FINISH_REASONS = ("stop", "length", "abort")
SCHEDULINGS = ("continuous", "static")
PREEMPTIONS = ("recompute", "swap")


class EngineError(ValueError):
    """A request (or engine setting) that cannot be served as asked."""


class QueueFull(RuntimeError):
    """The waiting queue is at EngineConfig.max_queue; retry later."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings. temperature 0 is greedy; top_k 0 and top_p 1 are off.
    seed None: a fresh random seed. stop_token_ids end the request besides the EOS id (unless ignore_eos)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced for this request by this step() call
    finished: bool
    finish_reason: str | None  # "stop" (eos / stop id), "length" (max_tokens or context), "abort"
    num_prompt_tokens: int
    num_generated: int  # total so far


@dataclass(frozen=True)
class EngineConfig:
    """Pool, batch and scheduling limits. Empty bucket tuples get defaults from the limits:
    batch_buckets powers of two up to max_running; table_width_buckets one width, a whole context
    (max_model_len / block_size blocks). Prefill programs have shapes [rows, chunk]: the pairs
    prefill_row_buckets x chunk_buckets when either is given, else (r, max_tokens_per_step // r) for r in powers
    of two up to max_prefill_rows (every shape the size of the token budget: one long prompt, or several
    shorter chunks, without padding the batch to the longest chunk)."""

    num_blocks: int = 1024
    block_size: int = 16
    max_running: int = 32  # sequences decoded together
    max_tokens_per_step: int = 512  # token budget per step (decode tokens + prefill chunks)
    max_queue: int = 256  # waiting requests before QueueFull
    prefix_caching: bool = True
    preemption: str = "recompute"  # or "swap" (to host memory)
    scheduling: str = "continuous"  # or "static": admit a new batch only when the last one has finished
    max_model_len: int | None = None  # context limit per request (default: the model's max_seq_len)
    max_prefill_rows: int = 4  # prompts prefilled in one step
    watermark_blocks: int | None = None  # free blocks kept back when admitting (default: 1% of the pool)
    batch_buckets: tuple[int, ...] = ()
    prefill_row_buckets: tuple[int, ...] = ()
    chunk_buckets: tuple[int, ...] = ()
    table_width_buckets: tuple[int, ...] = ()
    decode_impl: str = "auto"  # paged decode attention: "auto" | "pallas" | "xla"
    prefill_impl: str = "auto"  # paged prefill attention: "auto" | "flash" | "xla" (see paged.resolve_prefill_impl)
    cache_dtype: str | None = None  # default: the model's compute dtype
    async_scheduling: bool = True  # schedule and dispatch step n + 1 before reading step n's tokens back


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_preempted: int  # preempted and not running again yet (swapped out, or waiting to recompute)
    blocks_used: int
    blocks_total: int
    prompt_tokens_total: int
    generated_tokens_total: int
    preemptions_total: int


# --- buckets ---------------------------------------------------------------------------------------

def _powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return tuple(sizes + [limit])


def _bucket(buckets: tuple[int, ...], size: int) -> int:
    """The smallest bucket >= size (buckets sorted ascending)."""
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise EngineError(f"size {size} is above the largest bucket {buckets[-1]}")
    return buckets[index]


@dataclass(frozen=True)
class Buckets:
    batch: tuple[int, ...]
    prefill_shapes: tuple[tuple[int, int], ...]  # (rows, chunk)
    table_width: tuple[int, ...]

    @property
    def max_prefill_rows(self) -> int:
        return max(rows for rows, _ in self.prefill_shapes)

    @property
    def max_chunk(self) -> int:
        return max(chunk for _, chunk in self.prefill_shapes)


def resolve_config(config: EngineConfig, cfg: ModelConfig) -> tuple[int, Buckets]:
    """Check the settings; (max_model_len, the bucket sets with defaults filled in)."""
    max_model_len = config.max_model_len or cfg.max_seq_len
    checks = [
        (config.num_blocks >= 1, f"num_blocks={config.num_blocks}: must be >= 1"),
        (config.block_size >= 1, f"block_size={config.block_size}: must be >= 1"),
        (config.max_running >= 1, f"max_running={config.max_running}: must be >= 1"),
        (config.max_tokens_per_step >= config.max_running,
         f"max_tokens_per_step={config.max_tokens_per_step} is below max_running={config.max_running}: every "
         f"running request needs one token of the budget per step"),
        (config.max_queue >= 1, f"max_queue={config.max_queue}: must be >= 1"),
        (config.max_prefill_rows >= 1, f"max_prefill_rows={config.max_prefill_rows}: must be >= 1"),
        (config.preemption in PREEMPTIONS, f"preemption={config.preemption!r}: expected one of {PREEMPTIONS}"),
        (config.scheduling in SCHEDULINGS, f"scheduling={config.scheduling!r}: expected one of {SCHEDULINGS}"),
        (2 <= max_model_len <= cfg.max_seq_len,
         f"max_model_len={max_model_len}: must be in [2, the model's max_seq_len {cfg.max_seq_len}]"),
    ]
    for ok, message in checks:
        if not ok:
            raise EngineError(message)
    resolve_decode_impl(config.decode_impl, cfg)
    try:
        resolve_prefill_impl(config.prefill_impl, cfg)
    except PagedCacheError as error:
        raise EngineError(str(error)) from None
    max_blocks = -(-max_model_len // config.block_size)
    step = config.max_tokens_per_step
    rows = tuple(sorted(set(config.prefill_row_buckets)))
    chunks = tuple(sorted(set(config.chunk_buckets)))
    if rows or chunks:
        rows = rows or _powers_of_two_up_to(config.max_prefill_rows)
        chunks = chunks or tuple(sorted({max(1, step // 4), step}))
        shapes = tuple((r, c) for r in rows for c in chunks)
    else:
        shapes = tuple((r, max(1, step // r)) for r in _powers_of_two_up_to(config.max_prefill_rows))
    buckets = Buckets(
        batch=tuple(sorted(set(config.batch_buckets))) or _powers_of_two_up_to(config.max_running),
        prefill_shapes=shapes,
        table_width=tuple(sorted(set(config.table_width_buckets))) or (max_blocks,),
    )
    for name, sizes, need in (("batch_buckets", buckets.batch, config.max_running),
                              ("table_width_buckets", buckets.table_width, max_blocks)):
        if sizes[0] < 1 or sizes[-1] < need:
            raise EngineError(f"{name}={sizes}: sizes must be >= 1 and the largest >= {need}")
    if min(min(shape) for shape in shapes) < 1 or max(c for _, c in shapes) > step:
        raise EngineError(f"prefill shapes {shapes} (prefill_row_buckets x chunk_buckets): sizes must be >= 1, chunks "
                          f"<= max_tokens_per_step={step}")
    return max_model_len, buckets


# --- device programs -------------------------------------------------------------------------------

TRACES: collections.Counter = collections.Counter()  # program name -> times traced (= compiled)


def sample_rows(logits: jax.Array, greedy: jax.Array, sampling: dict, steps: jax.Array, sort: bool) -> jax.Array:
    """The next token per row [batch] int32 from float32 logits [batch, vocab]: greedy rows (temperature 0) keep
    their argmax `greedy`, others temperature / top-k / top-p (the sort only when `sort`: some row has top-k or
    top-p) then the Gumbel-max draw keyed by (seed, steps[row]) as `sampling.choose` (which keys a batch by one
    step). No lax.cond: an XLA conditional on a GPU reads its predicate back to the host, which would make
    every dispatch wait for the device (the host decides instead, by which program it runs)."""
    arrays = SamplingArrays(temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
                            min_p=None, repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
                            seed=sampling["seed"], logit_bias=None)
    filtered = filter_logits(logits, arrays, SamplingFeatures(sort=sort))
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(arrays.seed, steps)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (logits.shape[-1],), jnp.float32))(keys)
    sampled = jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32)
    return jnp.where(sampling["temperature"] > 0, sampled, greedy)


def keep_sampled(slot_tokens: jax.Array, slots: jax.Array, tokens: jax.Array) -> jax.Array:
    """slot_tokens [num_slots] with each row's sampled token [rows] stored at its request's slot [rows] (-1: an
    empty row, dropped): where the next step's program reads it without a round trip through the host."""
    return slot_tokens.at[jnp.where(slots >= 0, slots, slot_tokens.shape[0])].set(tokens, mode="drop")


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache", "slot_tokens"))
def decode_program(dparams, cache, slot_tokens, last_tokens, from_slot, slots, block_tables, lengths, *, cfg, impl):
    """One token per row (length -1: an empty row) and its greedy successor: (tokens [batch], float32 logits
    [batch, padded_vocab] for `sample_program`, cache, slot_tokens). A row's input token is last_tokens[row],
    or, where from_slot[row], the token the previous step chose for it (slot_tokens[slots[row]], still on the
    device: asynchronous scheduling)."""
    TRACES["decode"] += 1
    last = jnp.where(from_slot, slot_tokens[jnp.maximum(slots, 0)], last_tokens)
    logits, cache = decode_step_paged(dparams, last, cache, block_tables, lengths, cfg, impl)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, logits, cache, keep_sampled(slot_tokens, slots, tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache", "slot_tokens"))
def prefill_program(dparams, cache, slot_tokens, tokens, slots, block_tables, context_lengths, chunk_lengths, *, cfg,
                    impl):
    """A chunk per row [rows, chunk] after its stored tokens, and the greedy token after each row's last chunk
    token: (tokens [rows], float32 logits [rows, padded_vocab], cache, slot_tokens)."""
    TRACES["prefill"] += 1
    logits, cache = prefill_paged(dparams, tokens, cache, block_tables, context_lengths, chunk_lengths, cfg, impl)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return greedy, logits, cache, keep_sampled(slot_tokens, slots, greedy)


@functools.partial(jax.jit, static_argnames=("sort",), donate_argnames=("slot_tokens",))
def sample_program(logits, greedy, sampling, steps, slot_tokens, slots, *, sort):
    """Rows with temperature > 0 drawn from their logits (`sample_rows`), run after a program only when its batch
    has such rows: (tokens [rows], slot_tokens)."""
    TRACES["sample"] += 1
    tokens = sample_rows(logits, greedy, sampling, steps, sort)
    return tokens, keep_sampled(slot_tokens, slots, tokens)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_program(cache, copies):
    TRACES["copy"] += 1
    return copy_blocks(cache, copies)


@jax.jit
def read_blocks(cache, blocks):
    """Blocks [n] (-1: padding, read as block 0) of every layer's pool: [layers, 2, n, block_size, kv_heads, hd]."""
    TRACES["swap_out"] += 1
    index = jnp.maximum(blocks, 0)
    return jnp.stack([jnp.stack([layer["k"][index], layer["v"][index]]) for layer in cache["layers"]])


@functools.partial(jax.jit, donate_argnames=("cache",))
def write_blocks(cache, blocks, data):
    """The inverse of read_blocks: data [layers, 2, n, ...] into blocks [n] (-1: skipped)."""
    TRACES["swap_in"] += 1

    def put(pool, new):
        target = jnp.where(blocks >= 0, blocks, pool.shape[0])
        return pool.at[target].set(new.astype(pool.dtype), mode="drop")

    return {"layers": tuple({"k": put(layer["k"], data[i, 0]), "v": put(layer["v"], data[i, 1])}
                            for i, layer in enumerate(cache["layers"]))}


_prepare_jit = jax.jit(prepare_params, static_argnames=("cfg",))


# --- requests ----------------------------------------------------------------------------------------

@dataclass(eq=False)  # compared by identity: queues test membership often
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival: int  # FCFS order
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    computed: int = 0  # tokens whose K/V are in the pool (valid while in the manager)
    state: str = "waiting"  # "waiting" | "running" | "swapped" | "done"
    swapped: np.ndarray | None = None  # host copy of its blocks while swapped out
    preempted: bool = False
    inflight: int = 0  # tokens sampled by a dispatched step, not read back yet (0 or 1 while scheduling)
    slot: int = -1  # its row of the engine's per-slot arrays while running
    table_len: int = 0  # blocks of its table copied into the engine's block-table array

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled (1 when decoding): computed
        counts the tokens whose K/V a dispatched step writes, tokens + inflight those sampled."""
        return len(self.tokens) + self.inflight - self.computed


@dataclass
class _Work:
    """A step's plan: rows of the decode and prefill programs, and block copies to apply first."""

    decode: list[_Request] = field(default_factory=list)
    prefill: list[tuple[_Request, int]] = field(default_factory=list)  # (request, chunk length)
    prefill_shape: tuple[int, int] = (0, 0)  # (rows, chunk) of the prefill program
    copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Launch:
    """A dispatched step: each program's sampled tokens (on the device) with the request of each row (None: a
    row whose token is not kept), and every request it ran (their K/V to commit once the tokens are known)."""

    ran: list[_Request]
    rows: list[tuple[jax.Array, list[_Request | None]]] = field(default_factory=list)


def fit_prefill(chunks: list, shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], list]:
    """The prefill program shape (rows, chunk) that runs the most of the wanted chunks [(request, length)] (the
    first rows, in order, each cut to the shape's chunk), fewest slots on a tie; and the chunks it runs."""
    def tokens(shape):
        rows, chunk = shape
        return sum(min(n, chunk) for _, n in chunks[:rows])

    shape = max(shapes, key=lambda shape: (tokens(shape), -shape[0] * shape[1], -shape[0]))
    rows, chunk = shape
    return shape, [(request, min(n, chunk)) for request, n in chunks[:rows]]


class Engine:
    """Continuous batching over a paged KV cache; see the module docstring. Not thread-safe."""

    def __init__(self, params, cfg: ModelConfig, config: EngineConfig = EngineConfig(),
                 eos_token_id: int | None = None, *, prepared: bool = False):
        """params: the model's parameters, or (prepared=True) weights already in the decode layout
        (`decode_model.prepare_params`, or `quant.model.quantized_decode_params` for quantized matrices)."""
        self.max_model_len, self.buckets = resolve_config(config, cfg)
        if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
            raise EngineError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {cfg.vocab_size})")
        self.cfg, self.config, self.eos_token_id = cfg, config, eos_token_id
        self.impl = resolve_decode_impl(config.decode_impl, cfg)
        self.prefill_impl = resolve_prefill_impl(config.prefill_impl, cfg)
        # The Pallas kernel reads each row only up to its length: one table width serves every decode batch.
        self.decode_widths = self.buckets.table_width[-1:] if self.impl == "pallas" else self.buckets.table_width
        self.dparams = params if prepared else _prepare_jit(params, cfg)
        self.cache = init_paged_cache(cfg, config.num_blocks, config.block_size, config.cache_dtype)
        self.manager = BlockManager(config.num_blocks, config.block_size, config.prefix_caching)
        self.watermark = (max(1, config.num_blocks // 100) if config.watermark_blocks is None
                          else config.watermark_blocks)
        self.requests: dict[str, _Request] = {}
        self.waiting: list[_Request] = []  # sorted by arrival (preempted ones go back to their place)
        self.running: list[_Request] = []  # sorted by arrival
        self.swapped: list[_Request] = []  # sorted by arrival
        self.aborted: list[_Request] = []  # to report once
        self._arrivals = itertools.count()
        self._seeds = np.random.default_rng()
        self.prompt_tokens_total = self.generated_tokens_total = self.preemptions_total = 0
        self.steps_total = self.swap_outs_total = 0
        self._static_rows = 0  # static batching: rows of the batch running now
        # Per-slot host arrays, kept up to date as requests join, grow and leave (a step gathers its rows from
        # them); row max_running is the empty row that pads a batch.
        slots, width = config.max_running, self.buckets.table_width[-1]
        self._free_slots = list(range(slots))
        self._tables = np.full((slots + 1, width), -1, np.int32)
        self._sampling = {"temperature": np.zeros(slots + 1, np.float32), "top_k": np.zeros(slots + 1, np.int32),
                          "top_p": np.ones(slots + 1, np.float32), "seed": np.zeros(slots + 1, np.uint32)}
        self._slot_tokens = jnp.zeros(slots, jnp.int32)  # each slot's last sampled token, on the device
        self._inflight: _Launch | None = None  # the dispatched step whose tokens are not read back yet
        self.host_seconds = collections.Counter()  # step() time by phase: schedule, dispatch, wait, collect

    # --- requests in and out ------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> None:
        """Queue a request (FCFS). Raises EngineError for a bad request, QueueFull when the queue is full."""
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already in use; give each request its own id")
        prompt = self._check_prompt(prompt_ids)
        self._check_params(params, len(prompt))
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue={self.config.max_queue}); "
                            f"retry later")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**32))
        request = _Request(request_id, prompt, params, seed, next(self._arrivals))
        self.requests[request_id] = request
        self.waiting.append(request)
        self.prompt_tokens_total += len(prompt)

    def _check_prompt(self, prompt_ids) -> list[int]:
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise EngineError("prompt_ids must be a list of integer token ids") from None
        if not prompt:
            raise EngineError("empty prompt: give at least one token (e.g. the BOS / end-of-text id)")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return prompt

    def _check_params(self, params: SamplingParams, prompt_len: int) -> None:
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not (isinstance(params.max_tokens, (int, np.integer)) and params.max_tokens >= 1):
            raise EngineError(f"max_tokens={params.max_tokens}: must be an integer >= 1")
        if prompt_len + params.max_tokens > self.max_model_len:
            raise EngineError(f"prompt of {prompt_len} tokens + max_tokens={params.max_tokens} is above the context "
                              f"of {self.max_model_len} tokens; shorten the prompt or ask for fewer tokens")
        blocks = self.manager.blocks_needed(prompt_len + params.max_tokens)
        if blocks > self.config.num_blocks:
            raise EngineError(f"prompt + max_tokens need {blocks} KV cache blocks, the pool has "
                              f"{self.config.num_blocks}; ask for fewer tokens (or start with more num_blocks)")
        if not (np.isfinite(params.temperature) and params.temperature >= 0):
            raise EngineError(f"temperature={params.temperature}: must be >= 0 (0 is greedy)")
        if not (isinstance(params.top_k, (int, np.integer)) and params.top_k >= 0):
            raise EngineError(f"top_k={params.top_k}: must be an integer >= 0 (0 disables it)")
        if not 0 < params.top_p <= 1:
            raise EngineError(f"top_p={params.top_p}: must be in (0, 1] (1 disables it)")
        if params.seed is not None and not (isinstance(params.seed, (int, np.integer)) and 0 <= params.seed < 2**32):
            raise EngineError(f"seed={params.seed}: must be an integer in [0, 2**32) or None")
        bad = [t for t in params.stop_token_ids if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"stop token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def abort(self, request_id: str) -> None:
        """Drop a request now (its blocks freed); the next step() reports it once. Unknown / finished: no-op."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self._finish(request)
        self.aborted.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests or self.aborted or self._inflight)

    def update_weights(self, params, *, prepared: bool = False) -> None:
        """Serve new weights of the same model (RL: the policy after an optimizer step), between requests: they are
        prepared on their device (no copy through the host), the compiled programs are kept, and the prefix
        cache, whose K/V the old weights computed, is emptied. params as for the constructor."""
        if self.has_unfinished():
            raise EngineError("update_weights needs an idle engine: requests are still waiting or running")
        try:
            new = params if prepared else _prepare_jit(params, self.cfg)
        except (TypeError, ValueError) as error:  # shapes that do not make this model's decode layout
            raise EngineError(f"update_weights: the new weights are not this model's ({error})") from None
        old_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), self.dparams)
        new_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), new)
        if old_shapes != new_shapes:
            raise EngineError("update_weights: the new weights are not this model's (shapes or dtypes differ)")
        self.dparams = new
        self.manager = BlockManager(self.config.num_blocks, self.config.block_size, self.config.prefix_caching)

    def stats(self) -> EngineStats:
        preempted = sum(r.preempted for r in self.waiting) + len(self.swapped)
        return EngineStats(num_waiting=len(self.waiting) + len(self.swapped), num_running=len(self.running),
                           num_preempted=preempted, blocks_used=self.manager.allocator.num_used,
                           blocks_total=self.config.num_blocks, prompt_tokens_total=self.prompt_tokens_total,
                           generated_tokens_total=self.generated_tokens_total,
                           preemptions_total=self.preemptions_total)

    def kv_utilization(self) -> dict:
        """KV memory use now: the paged pool's (tokens stored / slots of blocks in use) against a contiguous
        cache holding the same running requests, one row of max_model_len slots each ("contiguous") or of
        prompt + max_tokens slots each ("contiguous_reserved")."""
        lengths = [self.manager.length(r.request_id) for r in self.running]
        reserved = sum(len(r.prompt) + r.params.max_tokens for r in self.running)
        return {"paged": self.manager.utilization(),
                "contiguous": float(sum(lengths)) / (len(lengths) * self.max_model_len) if lengths else 1.0,
                "contiguous_reserved": float(sum(lengths)) / reserved if reserved else 1.0,
                "tokens_stored": self.manager.tokens_stored(), "running": len(lengths)}

    # --- scheduling -------------------------------------------------------------------------------

    def _preempt(self, request: _Request) -> None:
        """Take a running request off the batch to free its blocks (recompute later, or swap to host)."""
        self.running.remove(request)
        self._release_slot(request)
        self.preemptions_total += 1
        request.preempted = True
        if self.config.preemption == "swap" and request.computed > 0:
            blocks = self.manager.block_table(request.request_id)[: self.manager.blocks_needed(request.computed)]
            width = _bucket(self.buckets.table_width, len(blocks))
            ids = np.full(width, -1, np.int32)
            ids[: len(blocks)] = blocks
            request.swapped = np.asarray(read_blocks(self.cache, ids))[:, :, : len(blocks)]
            self.swap_outs_total += 1
            self.manager.free(request.request_id)
            request.state = "swapped"
            bisect.insort(self.swapped, request, key=lambda r: r.arrival)
        else:
            self.manager.free(request.request_id)
            request.computed = 0
            request.state = "waiting"
            bisect.insort(self.waiting, request, key=lambda r: r.arrival)

    def _reserve_or_preempt(self, request: _Request, scheduled: set, work: _Work) -> bool:
        """Reserve the decode slot of a running request, preempting the newest unscheduled running requests
        while the pool is short. False when the request itself had to go."""
        if request.pending == 1 and self._slot_ready(request):
            return True
        # slots up to the chunk's end, counted from the tokens the manager holds (fewer than `computed` while
        # the values of tokens in flight are unknown: they are committed when read back)
        needed = request.computed + request.pending - self.manager.length(request.request_id)
        while True:
            try:
                copies = self.manager.reserve(request.request_id, needed)
                work.copies += copies
                self._sync_table(request, copies)
                return True
            except PoolExhausted:
                victims = [r for r in self.running if r.request_id not in scheduled]
                victim = victims[-1]  # the newest (request itself is among them)
                self._preempt(victim)
                if victim is request:
                    return False

    def _slot_ready(self, request: _Request) -> bool:
        """The decode token's slot is already in the request's own block (a block of its table, not shared):
        `reserve` would change nothing (most decode steps)."""
        index = request.computed // self.config.block_size
        return index < request.table_len and self.manager.allocator.refcounts[self._tables[request.slot, index]] == 1

    def _admit(self, request: _Request) -> bool:
        """Give a waiting or swapped-out request blocks for all its tokens (prefix-cache hits reused, a swapped
        one's blocks copied back from host memory); False when the pool is short (beyond the watermark) or the
        request's last token is still in flight (it was preempted this step)."""
        tokens = request.tokens
        if request.inflight:
            return False
        if self.running and self.manager.blocks_needed(len(tokens)) > self.manager.allocator.num_free - self.watermark:
            return False
        try:
            hit = self.manager.add_sequence(request.request_id, tokens)
        except PoolExhausted:
            return False
        if request.swapped is not None:
            first, count = hit // self.config.block_size, request.swapped.shape[2]
            if first < count:  # restore the blocks the prefix cache did not give back
                blocks = self.manager.block_table(request.request_id)[first:count]
                width = _bucket(self.buckets.table_width, len(blocks))
                ids = np.full(width, -1, np.int32)
                ids[: len(blocks)] = blocks
                data = np.zeros((*request.swapped.shape[:2], width, *request.swapped.shape[3:]),
                                request.swapped.dtype)
                data[:, :, : len(blocks)] = request.swapped[:, :, first:]
                self.cache = write_blocks(self.cache, ids, data)
                self.manager.commit(request.request_id, tokens[hit: request.computed])
            request.computed = max(hit, request.computed)
            request.swapped = None
        else:
            request.computed = hit
        request.preempted = False
        self._take_slot(request)
        return True

    def _at_limit(self, request: _Request) -> bool:
        """Its token in flight is its last by length (max_tokens or the context): nothing more to schedule."""
        generated = request.num_generated + request.inflight
        return generated >= request.params.max_tokens or len(request.tokens) + request.inflight >= self.max_model_len

    def _schedule(self) -> _Work:
        work = self._pick()
        if work.prefill:
            work.prefill_shape, work.prefill = fit_prefill(work.prefill, self.buckets.prefill_shapes)
        return work

    def _pick(self) -> _Work:
        work = _Work()
        budget = self.config.max_tokens_per_step
        max_chunk = self.buckets.max_chunk
        max_rows = self.buckets.max_prefill_rows
        scheduled: set[str] = set()
        preemptions_before = self.preemptions_total
        # 1. decode tokens of running requests, oldest first; preempt the newest when the pool is short
        for request in list(self.running):
            if request.pending == 1 and request.state == "running" and not self._at_limit(request):
                if self._reserve_or_preempt(request, scheduled, work):
                    work.decode.append(request)
                    scheduled.add(request.request_id)
                    budget -= 1
        # 2. the next prompt chunk of running requests still prefilling
        for request in list(self.running):
            if request.pending > 1 and request.state == "running" and budget > 0 and len(work.prefill) < max_rows:
                chunk = min(request.pending, budget, max_chunk)
                if self._reserve_or_preempt(request, scheduled, work):
                    work.prefill.append((request, chunk))
                    scheduled.add(request.request_id)
                    budget -= chunk
        # 3. requests joining now: swapped-out first, then waiting (FCFS: none overtakes an older one).
        # Static batching admits a whole batch at once, and only when the previous one has left.
        static = self.config.scheduling == "static"
        if (static and (self.running or self.swapped)) or self.preemptions_total > preemptions_before:
            return work  # (nobody joins in a step that had to preempt: the pool is short)
        for queue in (self.swapped, self.waiting):
            while queue and len(self.running) < self.config.max_running:
                if not static and (budget <= 0 or len(work.prefill) >= max_rows):
                    return work
                request = queue[0]
                if not self._admit(request):
                    return work
                queue.pop(0)
                request.state = "running"
                bisect.insort(self.running, request, key=lambda r: r.arrival)
                scheduled.add(request.request_id)
                if request.pending == 1 and budget > 0:
                    work.decode.append(request)
                    budget -= 1
                elif request.pending > 1 and budget > 0 and len(work.prefill) < max_rows:
                    chunk = min(request.pending, budget, max_chunk)
                    work.prefill.append((request, chunk))
                    budget -= chunk
            if queue:  # an older request could not join: no younger one may overtake it
                break
        if static and self.running:
            self._static_rows = len(self.running)
        return work

    # --- one iteration ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return one output per request that got tokens or finished.

        With async_scheduling the tokens returned are the previous step's: this step is dispatched first, so
        the device runs it while the host reads those tokens back and does the bookkeeping (a request that
        stopped on EOS or a stop id was scheduled once more: that extra token is dropped)."""
        outputs = [RequestOutput(r.request_id, [], True, "abort", len(r.prompt), r.num_generated) for r in self.aborted]
        self.aborted = []
        tick = time.perf_counter()
        work = self._schedule()
        tock = time.perf_counter()
        launch = self._launch(work) if work.prefill or work.decode else None
        self.host_seconds["schedule"] += tock - tick
        self.host_seconds["dispatch"] += time.perf_counter() - tock
        if self.config.async_scheduling:
            launch, self._inflight = self._inflight, launch
        if launch is not None:
            outputs += self._collect(launch)
        return outputs

    def _launch(self, work: _Work) -> _Launch:
        """Dispatch the step's programs (copy-on-write copies, prefill chunks, decode tokens) without waiting."""
        self.steps_total += 1
        if work.copies:
            self.cache = copy_program(self.cache, pad_copies(work.copies, self.buckets.batch[-1]))
        launch = _Launch(ran=[r for r, _ in work.prefill] + work.decode)
        if work.prefill:
            tokens = self._run_prefill(work.prefill, work.prefill_shape)
            launch.rows.append((tokens, [r if n == r.pending else None for r, n in work.prefill]))
        if work.decode:
            launch.rows.append((self._run_decode(work.decode), list(work.decode)))
        for request, chunk in work.prefill:
            request.computed += chunk
        for request in work.decode:
            request.computed += 1
        for _, requests in launch.rows:
            for request in requests:
                if request is not None:
                    request.inflight += 1
        return launch

    def _collect(self, launch: _Launch) -> list[RequestOutput]:
        """Read a dispatched step's tokens back (waiting for the device), append them, commit the K/V written."""
        tick = time.perf_counter()
        values = [np.asarray(tokens) for tokens, _ in launch.rows]
        tock = time.perf_counter()
        outputs = []
        for (_, requests), tokens in zip(launch.rows, values):
            for row, request in enumerate(requests):
                if request is not None and request.state != "done":  # done: aborted, or stopped a step earlier
                    request.inflight -= 1
                    outputs.append(self._append(request, int(tokens[row])))
        for request in launch.ran:
            if request.state != "done" and request.request_id in self.manager:
                committed = self.manager.length(request.request_id)
                known = min(request.computed, len(request.tokens))  # K/V written and token value known
                if known > committed:
                    self.manager.commit(request.request_id, request.tokens[committed:known])
        self.host_seconds["wait"] += tock - tick
        self.host_seconds["collect"] += time.perf_counter() - tock
        return outputs

    def _append(self, request: _Request, token: int) -> RequestOutput:
        request.tokens.append(token)
        self.generated_tokens_total += 1
        params = request.params
        reason = None
        if (token == self.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif request.num_generated >= params.max_tokens or len(request.tokens) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(request)
        return RequestOutput(request.request_id, [token], reason is not None, reason, len(request.prompt),
                             request.num_generated)

    def _finish(self, request: _Request) -> None:
        """Take a request out of the engine (finished or aborted): its queue, blocks and slot."""
        queue = {"waiting": self.waiting, "running": self.running, "swapped": self.swapped}[request.state]
        queue.remove(request)
        request.state = "done"
        if request.request_id in self.manager:
            self.manager.free(request.request_id)
        request.swapped = None
        self._release_slot(request)
        del self.requests[request.request_id]

    # --- per-slot arrays --------------------------------------------------------------------------

    def _take_slot(self, request: _Request) -> None:
        slot = request.slot = self._free_slots.pop()
        p = request.params
        for name, value in (("temperature", p.temperature), ("top_k", p.top_k), ("top_p", p.top_p),
                            ("seed", request.seed)):
            self._sampling[name][slot] = value
        request.table_len = 0
        self._sync_table(request)

    def _release_slot(self, request: _Request) -> None:
        if request.slot >= 0:
            self._tables[request.slot] = -1
            self._free_slots.append(request.slot)
            request.slot = -1

    def _sync_table(self, request: _Request, copies: list | None = None) -> None:
        """Copy the request's block table into its slot's row when it grew (or copy-on-write changed it)."""
        table = self.manager.sequences[request.request_id].block_table
        if copies or len(table) != request.table_len:
            self._tables[request.slot, : len(table)] = table
            request.table_len = len(table)

    def _rows(self, requests: list[_Request], rows: int, widths: tuple[int, ...]) -> tuple[np.ndarray, dict, np.ndarray]:
        """Slots [rows] (-1: padding), sampling arrays and block tables [rows, width bucket] of a program's rows."""
        slots = np.full(rows, -1, np.int32)
        slots[: len(requests)] = [r.slot for r in requests]
        index = np.where(slots >= 0, slots, self.config.max_running)
        width = _bucket(widths, max((r.table_len for r in requests), default=1))
        return slots, {name: values[index] for name, values in self._sampling.items()}, self._tables[index, :width]

    def _run_decode(self, requests: list[_Request]) -> jax.Array:
        # static batching runs its batch padded to the size it started with, as a non-continuous server does
        rows = _bucket(self.buckets.batch, max(len(requests), self._static_rows))
        last = np.zeros(rows, np.int32)
        from_slot = np.zeros(rows, bool)
        lengths = np.full(rows, -1, np.int32)
        steps = np.zeros(rows, np.int32)
        for row, request in enumerate(requests):
            from_slot[row] = request.inflight > 0  # its input token is the one the step in flight chooses
            last[row] = 0 if request.inflight else request.tokens[-1]
            lengths[row], steps[row] = request.computed, request.num_generated + request.inflight
        slots, sampling, tables = self._rows(requests, rows, self.decode_widths)
        tokens, logits, self.cache, self._slot_tokens = decode_program(
            self.dparams, self.cache, self._slot_tokens, last, from_slot, slots, tables, lengths, cfg=self.cfg,
            impl=self.impl)
        return self._sample(tokens, logits, sampling, steps, slots)

    def _run_prefill(self, chunks: list[tuple[_Request, int]], shape: tuple[int, int]) -> jax.Array:
        rows, width = shape
        tokens = np.zeros((rows, width), np.int32)
        context, lengths, steps = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for row, (request, n) in enumerate(chunks):
            assert request.inflight == 0, "a prefill chunk's tokens are all known"
            tokens[row, :n] = request.tokens[request.computed: request.computed + n]
            context[row], lengths[row], steps[row] = request.computed, n, request.num_generated
        slots, sampling, tables = self._rows([r for r, _ in chunks], rows, self.buckets.table_width)
        greedy, logits, self.cache, self._slot_tokens = prefill_program(
            self.dparams, self.cache, self._slot_tokens, tokens, slots, tables, context, lengths, cfg=self.cfg,
            impl=self.prefill_impl)
        return self._sample(greedy, logits, sampling, steps, slots)

    def _sample(self, greedy: jax.Array, logits: jax.Array, sampling: dict, steps: np.ndarray,
                slots: np.ndarray) -> jax.Array:
        """The rows' tokens: the program's greedy ones, or, when some row has temperature > 0, sample_program's
        (with the sort when one of those rows has top-k or top-p)."""
        sampled = sampling["temperature"] > 0
        if not sampled.any():
            return greedy
        sort = bool((sampled & ((sampling["top_k"] > 0) | (sampling["top_p"] < 1))).any())
        tokens, self._slot_tokens = sample_program(logits, greedy, sampling, steps, self._slot_tokens, slots,
                                                   sort=sort)
        return tokens

    # --- warm-up ----------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile every program at every bucket shape (empty rows: nothing is written), so none compiles
        while serving."""
        b = self.buckets
        outputs = {}  # row count -> (greedy, logits), to compile sample_program on
        for rows in b.batch:
            slots = np.full(rows, -1, np.int32)
            zeros = np.zeros(rows, np.int32)
            for width in self.decode_widths:
                tables = np.full((rows, width), -1, np.int32)
                *out, self.cache, self._slot_tokens = decode_program(
                    self.dparams, self.cache, self._slot_tokens, zeros, np.zeros(rows, bool), slots, tables,
                    np.full(rows, -1, np.int32), cfg=self.cfg, impl=self.impl)
            outputs[rows] = out
        for rows, chunk in b.prefill_shapes:
            slots = np.full(rows, -1, np.int32)
            zeros = np.zeros(rows, np.int32)
            for width in b.table_width:
                tables = np.full((rows, width), -1, np.int32)
                *out, self.cache, self._slot_tokens = prefill_program(
                    self.dparams, self.cache, self._slot_tokens, np.zeros((rows, chunk), np.int32), slots, tables,
                    zeros, zeros, cfg=self.cfg, impl=self.prefill_impl)
            outputs[rows] = out
        for rows, (greedy, logits) in outputs.items():
            slots, sampling, _ = self._rows([], rows, b.table_width)
            for sort in (False, True):
                _, self._slot_tokens = sample_program(logits, greedy, sampling, np.zeros(rows, np.int32),
                                                      self._slot_tokens, slots, sort=sort)
        self.cache = copy_program(self.cache, pad_copies([], b.batch[-1]))
        if self.config.preemption == "swap":
            for width in b.table_width:
                ids = np.full(width, -1, np.int32)
                self.cache = write_blocks(self.cache, ids, np.asarray(read_blocks(self.cache, ids)))
        jax.block_until_ready(self.cache)
