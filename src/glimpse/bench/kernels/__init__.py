"""Kernel benchmarks, one module per op; they time the product's kernels (glimpse.kernels) and never the
reverse. Timers and the L2 rule: glimpse.bench.timing.

    python -m glimpse.bench.kernels --out DIR           # Mamba decode kernels: parity, sweeps, tables
    python -m glimpse.bench.kernels.norms               # RMS norms at 12B shapes (JSON lines)
    python -m glimpse.bench.kernels.prefill_attention   # paged prefill attention at 12B shapes
    python -m glimpse.bench.kernels.quant_linear        # bf16 / FP8 / NVFP4 linear layers at 12B shapes

common (shapes, copy-bandwidth floor, rows), ssm_update, conv, mamba_decode (the suite of the first
command), ssd (prompt scan and its launch-config sweep), norms, decode_attention, prefill_attention,
quant_linear.
"""
