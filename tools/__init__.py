"""Developer diagnostics and sweeps, run from the repository root; not part of the installed package.

    python3 -m tools.NAME ...        (or PYTHONPATH=. python3 tools/NAME.py ..., as on the GPU machine)
    bash tools/NAME.sh ...

Each file's docstring (or header comment) says what it measures and how to run it: flash-attention and
Mosaic GPU checks (fa_check, mosaic_check, mosaic_bwd_check), the fused cross-entropy gradient
(ce_grad_check), FP8 GEMM forms (fp8_probe), the jax-triton RMSNorm (triton_rms_norm, jax_triton_check),
training-step breakdowns and A/B runs (step_breakdown, step_ab, speed_sweep.sh, trace_top), the quantization GPU
run (quant_gpu_check.sh) and the device runs of issues 20, 21 and 22 (posttrain_gpu.sh, issue21_gpu.sh, issue22_gpu.sh).
User-facing runs and benchmarks are experiments (`python -m experiments --help`).
"""
