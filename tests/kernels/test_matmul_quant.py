"""The fused dequantize-matmul kernels against the XLA reference: interpret mode on CPUs, real sizes on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.matmul_quant import (
    MatmulTiles,
    choose_splits,
    deinterleave,
    default_tiles,
    nibble_asm,
    quantized_matmul_pallas,
    quantized_matmul_reference,
)
from llmjax.quant.formats import BITS, NF4_CODEBOOK, QuantizedMatrix, pack_codes, quantize

# (K, format, group, block_m, splits, nf4 lookup): the GEMV (block_m 1) and tensor-core tiles, without and with
# split-K (K = 160: five steps of 32 in three splits of 2, 2 and 1 steps)
CASES = [(128, "int8", None, 1, 2, "magic"), (128, "int8", None, 16, 1, "convert"), (128, "int4", 32, 1, 1, "magic"),
         (128, "int4", 32, 1, 4, "convert"), (160, "int4", 32, 1, 3, "magic"), (128, "int4", None, 16, 2, "magic"),
         (160, "int8", 32, 16, 3, "magic"), (128, "int3", 64, 16, 2, "magic"), (128, "int3", 64, 16, 1, "convert"),
         (128, "nf4", 32, 1, 2, "gather"), (128, "nf4", 32, 1, 1, "select"), (128, "nf4", 32, 16, 2, "select")]


# the swap_ab kernel (weights as the MMA's first operand): (K, format, group, splits, decode)
SWAP_CASES = [(128, "int4", 32, 2, "magic"), (160, "int4", 32, 3, "convert"), (160, "int8", None, 3, "magic"),
              (128, "int8", 32, 1, "convert"), (192, "nf4", 32, 3, "permute"), (128, "nf4", 32, 1, "gather")]


@pytest.mark.parametrize("k, fmt, group, block_m, splits, decode", CASES)
def test_interpret_matches_reference(k, fmt, group, block_m, splits, decode):
    """decode: the int formats' code -> float path, or for nf4 the table lookup."""
    lookup, int_decode = (decode, "magic") if fmt == "nf4" else ("gather", decode)
    w = jax.random.normal(jax.random.key(0), (k, 72)) * 0.02  # N = 72: a partial column tile
    q = quantize(w, fmt, group)
    tiles = MatmulTiles(block_m=block_m, block_n=32, block_k=32, splits=splits, nf4_lookup=lookup,
                        int_decode=int_decode, interpret=True)
    for rows in (1, 37) if block_m == 16 else (3,):  # one 16-row tile (masked) and three; the GEMV: a row each
        x = jax.random.normal(jax.random.key(rows), (rows, k))
        np.testing.assert_allclose(quantized_matmul_pallas(x, q, tiles=tiles), quantized_matmul_reference(x, q),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k, fmt, group, splits, decode", SWAP_CASES)
def test_swap_ab_interpret_matches_reference(k, fmt, group, splits, decode):
    """The transposed tensor-core kernel: zero points and scales applied to each step's product, in float32 and
    in bf16 (the GPU's operands: exact codes, NF4 levels rounded to bf16)."""
    lookup, int_decode = (decode, "magic") if fmt == "nf4" else ("permute", decode)
    w = jax.random.normal(jax.random.key(0), (k, 72)) * 0.02
    q = quantize(w, fmt, group)
    tiles = MatmulTiles(block_m=16, block_n=32, block_k=32, splits=splits, nf4_lookup=lookup, int_decode=int_decode,
                        interpret=True, swap_ab=True)
    for rows, dtype, tolerance in ((1, jnp.float32, 1e-5), (19, jnp.float32, 1e-5), (3, jnp.bfloat16, 1e-2)):
        x = jax.random.normal(jax.random.key(rows), (rows, k)).astype(dtype)
        out = quantized_matmul_pallas(x, q, tiles=tiles).astype(jnp.float32)
        reference = quantized_matmul_reference(x.astype(jnp.float32), q)
        np.testing.assert_allclose(out, reference, rtol=tolerance, atol=tolerance * float(jnp.abs(reference).max()))


def quantize_with_offsets(w, fmt: str, group: int | None) -> QuantizedMatrix:
    """GGUF Q4_1-style min form of w [..., K, N]: per group d = (max - min) / (2^bits - 1) and m = min (float16),
    codes round((w - m) / d); the matrix stores offsets (w = code * d + m), no zero points."""
    k, n = w.shape[-2:]
    group = group or k
    grouped = w.reshape(*w.shape[:-2], k // group, group, n)
    low, high = grouped.min(axis=-2), grouped.max(axis=-2)  # [..., groups, N]
    d = ((high - low) / (2 ** BITS[fmt] - 1)).astype(jnp.float16)
    m = low.astype(jnp.float16)
    codes = jnp.round((grouped - m[..., None, :].astype(jnp.float32)) / d[..., None, :].astype(jnp.float32))
    codes = jnp.clip(codes, 0, 2 ** BITS[fmt] - 1).astype(jnp.uint8).reshape(w.shape)
    return QuantizedMatrix(pack_codes(codes, BITS[fmt]), scales=d, offsets=m, format=fmt, group_size=group,
                           shape=(k, n))


# offsets (w = code * scale + offset) in each kernel: (K, format, group, block_m, splits, int decode, swap_ab) at
# awkward sizes (N = 72: a partial column tile; K = 160: five steps of 32 in uneven splits)
OFFSET_CASES = [(160, "int4", 32, 1, 3, "magic", False), (128, "int8", None, 1, 2, "convert", False),
                (160, "int4", 32, 16, 3, "magic", False), (160, "int8", 32, 16, 1, "convert", False),
                (128, "int3", 64, 16, 2, "magic", False), (160, "int4", 32, 16, 3, "magic", True),
                (128, "int4", None, 16, 2, "convert", True), (160, "int8", 32, 16, 3, "magic", True)]


@pytest.mark.parametrize("k, fmt, group, block_m, splits, decode, swap_ab", OFFSET_CASES)
def test_offsets_interpret_matches_reference(k, fmt, group, block_m, splits, decode, swap_ab):
    """The GEMV and the second-operand kernel dequantize code * scale + offset per weight (the tolerance of
    test_interpret_matches_reference); swap_ab adds offset * sum_k x_k to each step's product (its own test's
    tolerances, float32 and bf16)."""
    w = jax.random.normal(jax.random.key(0), (k, 72)) * 0.02 + 0.01  # not centred: offsets far from -absmax
    q = quantize_with_offsets(w, fmt, group)
    assert q.offsets is not None and q.zeros is None
    tiles = MatmulTiles(block_m=block_m, block_n=32, block_k=32, splits=splits, nf4_lookup="permute" if swap_ab
                        else "gather", int_decode=decode, interpret=True, swap_ab=swap_ab)
    if not swap_ab:
        for rows in (1, 37) if block_m == 16 else (3,):
            x = jax.random.normal(jax.random.key(rows), (rows, k))
            np.testing.assert_allclose(quantized_matmul_pallas(x, q, tiles=tiles), quantized_matmul_reference(x, q),
                                       rtol=1e-5, atol=1e-6)
        return
    for rows, dtype, tolerance in ((1, jnp.float32, 1e-5), (19, jnp.float32, 1e-5), (3, jnp.bfloat16, 1e-2)):
        x = jax.random.normal(jax.random.key(rows), (rows, k)).astype(dtype)
        out = quantized_matmul_pallas(x, q, tiles=tiles).astype(jnp.float32)
        reference = quantized_matmul_reference(x.astype(jnp.float32), q)
        np.testing.assert_allclose(out, reference, rtol=tolerance, atol=tolerance * float(jnp.abs(reference).max()))


def test_offsets_stacked_layers_through_the_kernel():
    """Stacked layers with offsets under jit + scan: each step's one-layer matrix runs the fused kernel (default
    tiles, interpret mode here) and matches the reference."""
    w = jax.random.normal(jax.random.key(0), (3, 96, 40)) * 0.02
    stacked = quantize_with_offsets(w, "int4", 32).with_matmul("pallas")
    assert stacked.lead_shape == (3,)
    x = jax.random.normal(jax.random.key(1), (2, 96))

    @jax.jit
    def run(x, stacked):
        return jax.lax.scan(lambda carry, qm: (carry, carry @ qm), x, stacked)[1]  # [layers, 2, 40]

    layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(3)]  # one QuantizedMatrix each
    reference = jnp.stack([quantized_matmul_reference(x, layer) for layer in layers])
    np.testing.assert_allclose(run(x, stacked), reference, rtol=1e-5, atol=1e-6)


def _run_ptx(asm: str, word: int) -> list[int]:
    """Interprets the straight-line b32 PTX of `nibble_asm` (prmt in its default mode, lop3, and, or, shifts) on one
    input register $2; returns the bf16 bit patterns of its two output registers, element order."""
    def prmt(a, b, selector):
        data, out = (b << 32) | a, 0
        for i in range(4):
            nibble = (selector >> (4 * i)) & 0xF
            byte = (data >> (8 * (nibble & 7))) & 0xFF
            out |= ((0xFF if byte & 0x80 else 0) if nibble & 8 else byte) << (8 * i)  # bit 3: replicate the sign
        return out

    def lop3(a, b, c, table):
        return sum(((table >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
                   for i in range(32))

    ops = {"prmt": prmt, "lop3": lop3, "and": lambda a, b: a & b, "or": lambda a, b: a | b,
           "shr": lambda a, b: a >> b, "shl": lambda a, b: a << b}
    registers = {"$2": word}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, operands = line.split(None, 1)
        target, *sources = [o.strip() for o in operands.split(",")]
        values = [registers[o] if o in registers else int(o, 0) for o in sources]
        registers[target] = ops[opcode.split(".")[0]](*values) & 0xFFFFFFFF
    return [registers["$0"] & 0xFFFF, registers["$0"] >> 16, registers["$1"] & 0xFFFF, registers["$1"] >> 16]


def test_nibble_asm_decodes_codes():
    """The GPU's inline PTX, interpreted: 128 + nibble (int4 / int8 planes) and NF4's bf16 levels of each nibble."""
    levels = [int(v) for v in np.asarray(NF4_CODEBOOK).astype(jnp.bfloat16).view(np.uint16)]
    codes = np.random.default_rng(0).integers(0, 256, (300, 4))
    for nibble in ("low", "high"):
        for table in (None, levels):
            asm = nibble_asm(nibble, table)
            for four in codes:
                values = [c & 0xF if nibble == "low" else c >> 4 for c in four]
                expected = [0x4300 | v for v in values] if table is None else [table[v] for v in values]
                assert _run_ptx(asm, int(sum(int(c) << (8 * i) for i, c in enumerate(four)))) == expected


def test_bfloat16_inputs_and_batch_axes():
    w = jax.random.normal(jax.random.key(0), (64, 48)) * 0.02
    x = jax.random.normal(jax.random.key(1), (2, 3, 64)).astype(jnp.bfloat16)
    q = quantize(w, "int4", 32).with_matmul("pallas")
    out = x @ q  # QuantizedMatrix.__rmatmul__ through the kernel (interpret mode here)
    assert out.shape == (2, 3, 48) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), quantized_matmul_reference(x, q).astype(jnp.float32),
                               rtol=2e-2, atol=2e-3)


def test_deinterleave_takes_every_parts_th_column():
    x = jnp.arange(3 * 40).reshape(3, 40)
    for parts in (1, 2, 8):
        for i, part in enumerate(deinterleave(x, parts)):
            np.testing.assert_array_equal(part, x[:, i::parts])


def test_default_tiles_split_k_to_fill_the_gpu():
    assert choose_splits(64, 32, 528) == 16  # 32 column tiles x 16 splits = 512 programs
    assert choose_splits(6, 100, 528) == 3  # 5 asked, but 6 steps in splits of 2 make 3
    assert choose_splits(172, 32, 528) == 16  # 11 steps each, the last 7 (K = 11008 in steps of 64)
    assert choose_splits(7, 600, 528) == 1
    decode = default_tiles(1, 4096, 4096, 128, interpret=True, fmt="int4")
    assert decode.swap_ab and decode.block_m == 16 and 128 % decode.block_k == 0 and decode.splits > 1
    assert default_tiles(8, 4096, 4096, 64, interpret=True, fmt="nf4").nf4_lookup == "permute"
    assert default_tiles(1, 4096, 4096, 4096, interpret=True, fmt="int8").block_m == 1  # the GEMV at one row
    assert default_tiles(1, 4096, 4096, 64, interpret=True, fmt="int3").block_m == 16  # no int3 GEMV
    assert default_tiles(512, 4096, 4096, 128, interpret=True).splits == 1  # prefill fills the GPU without splits


def test_bad_shapes():
    q = quantize(jnp.ones((64, 16)), "int8")
    with pytest.raises(ValueError, match="expects 64"):
        quantized_matmul_pallas(jnp.ones((1, 32)), q)
    with pytest.raises(ValueError, match="must divide the group size"):
        quantized_matmul_pallas(jnp.ones((1, 64)), quantize(jnp.ones((64, 16)), "int4", 32),
                                tiles=MatmulTiles(block_k=64, interpret=True))
    with pytest.raises(ValueError, match="splits=3: K=64 has 2 steps"):
        quantized_matmul_pallas(jnp.ones((1, 64)), q, tiles=MatmulTiles(block_k=32, splits=3, interpret=True))
    with pytest.raises(ValueError, match="splits=4: K=160 has 5 steps"):  # 5 steps in splits of 2 make 3, not 4
        quantized_matmul_pallas(jnp.ones((1, 160)), quantize(jnp.ones((160, 16)), "int8"),
                                tiles=MatmulTiles(block_k=32, splits=4, interpret=True))
    with pytest.raises(ValueError, match="int3 dots of depth 8; tensor cores need 16"):
        quantized_matmul_pallas(jnp.ones((1, 64)), quantize(jnp.ones((64, 16)), "int3", 64),
                                tiles=MatmulTiles(block_k=64))
    with pytest.raises(ValueError, match="int3 takes block_m >= 16"):
        quantized_matmul_pallas(jnp.ones((1, 64)), quantize(jnp.ones((64, 16)), "int3", 32),
                                tiles=MatmulTiles(block_m=1, block_k=32, interpret=True))
    with pytest.raises(ValueError, match="int_decode='cast'"):
        quantized_matmul_pallas(jnp.ones((1, 64)), q, tiles=MatmulTiles(block_k=32, int_decode="cast", interpret=True))
    with pytest.raises(ValueError, match="runs in the swap_ab kernel only"):
        quantized_matmul_pallas(jnp.ones((1, 64)), quantize(jnp.ones((64, 16)), "nf4", 32),
                                tiles=MatmulTiles(block_k=32, nf4_lookup="permute", interpret=True))
    with pytest.raises(ValueError, match="nf4_lookup='table'"):
        quantized_matmul_pallas(jnp.ones((1, 64)), q, tiles=MatmulTiles(block_k=32, nf4_lookup="table", interpret=True))


def _check_on_gpu(k, n, rows, fmt, group, tiles=None, quantizer=quantize):
    w = jax.random.normal(jax.random.key(0), (k, n)) * 0.02
    x = jax.random.normal(jax.random.key(1), (rows, k)).astype(jnp.bfloat16)
    q = quantizer(w, fmt, group)
    out = quantized_matmul_pallas(x, q, tiles=tiles).astype(jnp.float32)
    reference = quantized_matmul_reference(x.astype(jnp.float32), q)  # float32 throughout
    scale = float(jnp.abs(reference).max())
    np.testing.assert_allclose(out, reference, rtol=2e-2, atol=1e-2 * scale)  # bf16 weights / output rounding


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("rows", [1, 8, 512])
def test_gpu_matches_reference(fmt, rows):
    _check_on_gpu(4096, 4096, rows, fmt, {"int8": None, "int4": 128, "nf4": 64}[fmt])


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, rows, fmt, group, tiles", [
    (11008, 4096, 1, "int4", 128, None),  # llama-7b down: K split into 43 x 2 steps
    (2048, 1000, 1, "int4", 64, None),  # N not a multiple of the column tile
    (768, 2304, 3, "nf4", 64, MatmulTiles(1, 128, 64, 4, 2, 1, "select")),  # gpt2 qkv, the select chain, 3 rows
    (4096, 4096, 1, "int4", 128, MatmulTiles(1, 128, 64, 16, 2, 1, int_decode="convert")),  # int -> float converts
    (4096, 4096, 1, "int4", 128, MatmulTiles(16, 128, 128, 8, 4, 3)),  # tensor-core tiles at batch 1, split-K
    (4096, 1536, 40, "int3", 128, None),  # int3 (tensor cores only, groups of 128 or more), a partial row tile
    (11008, 4096, 8, "nf4", 64, None),  # batch-8 decode: swap_ab, uneven split-K
    (2048, 1000, 13, "int8", None, None),  # swap_ab: int8 in two nibble planes, a partial column tile, 13 rows
    (4096, 4096, 1, "int4", 128, MatmulTiles(16, 128, 128, 16, 4, 1, int_decode="convert", swap_ab=True)),
    (4096, 2048, 1, "nf4", 64, MatmulTiles(16, 128, 64, 16, 4, 1, "gather", swap_ab=True)),
    (4096, 4096, 1, "int4", 128, MatmulTiles(16, 128, 128, 16, 4, 3, swap_ab=True)),  # pipelined
    (4096, 4096, 8, "int4", 128, MatmulTiles(16, 128, 128, 8, 4, 3)),  # the weights as the second operand
    (4096, 4096, 1, "int8", None, MatmulTiles(16, 128, 64, 16, 4, 1, swap_ab=True)),  # int8 swap_ab at one row
])
def test_gpu_shapes_and_tiles(k, n, rows, fmt, group, tiles):
    _check_on_gpu(k, n, rows, fmt, group, tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, rows, fmt, group, tiles", [
    (2048, 1000, 1, "int4", 32, None),  # Q4_1's groups of 32: swap_ab at one row, a partial column tile
    (4096, 4096, 8, "int4", 32, None),  # batch-8 decode, swap_ab with split-K
    (2048, 1000, 1, "int8", 32, None),  # the GEMV
    (4096, 4096, 1, "int4", 128, MatmulTiles(1, 128, 64, 16, 2, 1, int_decode="convert")),  # int4 GEMV, converts
    (4096, 4096, 512, "int4", 32, None),  # prefill: the weights as the second operand
    (4096, 1536, 40, "int3", 128, None),
])
def test_gpu_offsets_match_reference(k, n, rows, fmt, group, tiles):
    _check_on_gpu(k, n, rows, fmt, group, tiles, quantizer=quantize_with_offsets)


def test_bench_runs_on_cpu(tmp_path):
    """The benchmark's CPU path (bf16 and XLA rows; the fused kernel only runs on GPUs) writes its JSON."""
    import json

    from llmjax.experiments.bench_matmul_quant import main

    out = tmp_path / "bench.json"
    assert main(["--shapes", "128x96", "--rows", "1,3", "--reps", "1", "--cold-mib", "0.01", "--min-products", "3",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [(r["k"], r["n"], r["rows"]) for r in record["results"]] == [(128, 96, 1), (128, 96, 3)]
    assert all(r["bf16_us"] > 0 and r["int4_xla_us"] > 0 and r["copies"] >= 2 for r in record["results"])


# --- the few-row form for CPUs (quantized_matvec) ------------------------------------------------------------------

# (K, N, format, group, storage): symmetric int8, zero points, offsets (GGUF's Q4_1 / Q5_1 forms); groups of 32, 48
# (16-row blocks) and one per output (K = 100: 25-row blocks for int8, 10-row for int4); N not a multiple of a vector
MATVEC_CASES = [(96, 40, "int8", 32, "symmetric"), (96, 72, "int4", 32, "zeros"), (96, 40, "int4", 32, "offsets"),
                (144, 40, "int8", 48, "offsets"), (144, 72, "int4", 48, "zeros"), (100, 24, "int8", None, "symmetric"),
                (100, 24, "int4", 50, "offsets")]


def _matvec_matrix(k, n, fmt, group, storage):
    w = jax.random.normal(jax.random.key(k + n), (k, n)) * 0.02
    if storage == "offsets":
        return quantize_with_offsets(w, fmt, group)
    return quantize(w, fmt, group, symmetric=storage == "symmetric")


@pytest.mark.parametrize("k, n, fmt, group, storage", MATVEC_CASES)
def test_matvec_matches_reference(k, n, fmt, group, storage):
    """float32 within rounding at one, three and 2 x 2 rows; bf16 in, bf16 out within bf16 rounding."""
    from llmjax.kernels.matmul_quant import quantized_matvec

    q = _matvec_matrix(k, n, fmt, group, storage)
    assert (q.offsets is not None) == (storage == "offsets") and (q.zeros is not None) == (storage == "zeros")
    for shape in ((1, k), (3, k), (2, 2, k)):
        x = jax.random.normal(jax.random.key(len(shape)), shape)
        reference = quantized_matmul_reference(x, q)
        out = jax.jit(quantized_matvec)(x, q)
        assert out.shape == reference.shape and out.dtype == jnp.float32
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * float(jnp.abs(reference).max()))
    x16 = x.astype(jnp.bfloat16)
    out16 = quantized_matvec(x16, q)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), quantized_matmul_reference(x16.astype(jnp.float32), q),
                               rtol=1e-2, atol=1e-2 * float(jnp.abs(reference).max()))


def test_auto_matmul_choice_on_cpu():
    """"auto" on a CPU: the few-row form for int8 / int4 at up to MATVEC_MAX_ROWS rows, else the XLA reference (more
    rows, nf4, int3); the other names as asked; an unknown name is refused."""
    from llmjax.kernels.matmul_quant import MATVEC_MAX_ROWS, QuantizationError, resolve_quantized_matmul

    int4, nf4 = quantize(jnp.ones((64, 16)), "int4", 32), quantize(jnp.ones((64, 16)), "nf4", 32)
    few, many = jnp.ones((MATVEC_MAX_ROWS, 64)), jnp.ones((MATVEC_MAX_ROWS + 1, 64))
    assert resolve_quantized_matmul("auto", few, int4) == "matvec"
    assert resolve_quantized_matmul("auto", many, int4) == "xla"
    assert resolve_quantized_matmul("auto", few, nf4) == "xla"
    assert resolve_quantized_matmul("xla", few, int4) == "xla"
    assert resolve_quantized_matmul("matvec", many, int4) == "matvec"
    with pytest.raises(QuantizationError, match="matmul='fast': expected one of 'xla', 'pallas', 'matvec', 'auto'"):
        int4.with_matmul("fast")
    x = jax.random.normal(jax.random.key(0), (2, 64))
    np.testing.assert_allclose(x @ int4.with_matmul("auto"), quantized_matmul_reference(x, int4), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x @ nf4.with_matmul("auto"), quantized_matmul_reference(x, nf4))


def test_matvec_is_not_dequantized_before_a_decoding_loop():
    """In a loop the weights are loop-invariant, and XLA hoists what depends on them alone out of it: the few-row
    form must not have its code conversion hoisted (a float32 copy of the matrix read by every step). The reference
    materialises the float matrix (within each step, tied to x on CPUs)."""
    k = n = 256
    q = quantize(jax.random.normal(jax.random.key(0), (k, n)), "int4", 32)

    def temp_bytes(matmul):
        qm = q.with_matmul(matmul)
        steps = jax.jit(lambda x, qm: jax.lax.fori_loop(0, 4, lambda i, x: jnp.tanh(x @ qm), x))
        return steps.lower(jnp.ones((1, k)), qm).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla") >= k * n * 4  # the float matrix, made once before the loop
    assert temp_bytes("matvec") < k * n  # less than the codes' own size: nothing of the matrix's size
