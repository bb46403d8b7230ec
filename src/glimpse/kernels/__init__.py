"""The model's compute ops. Each op's public module (activations, attention, causal_conv1d, norms, ssd,
quant_linear) holds the torch reference and the one switch to its fast path (`use_triton*`,
`use_scaled_mm`); the `triton_*` modules hold kernels and launchers only; `backend` says whether Triton can
run at all; quant_formats decodes the quantised checkpoint formats."""
