"""The model's compute ops. Each op's public module (activations, attention, causal_conv1d, norms, ssd) holds
the torch reference and the one switch to its Triton kernels (`use_triton*`); the `triton_*` modules hold
kernels and launchers only; `backend` says whether Triton can run at all."""
