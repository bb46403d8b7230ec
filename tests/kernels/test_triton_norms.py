"""Parity of the Triton RMS norms (kernels/triton_norms.py) with the torch references in kernels/norms.py.

Runs on CUDA only (skipped elsewhere, so CPU CI needs no Triton). For debugging on a CPU, set
TRITON_INTERPRET=1 and GLIMPSE_TEST_INTERPRET=1: the same checks then run on CPU tensors through the Triton
interpreter, which truncates fp32 -> bf16 instead of rounding to nearest; the bf16 tolerances allow for
that, and the "almost every element bit-equal" checks (which pin the rounding order) run on CUDA only.

The references always run on CPU copies of the inputs, so they never dispatch to the kernels under test.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from glimpse.kernels import norms as ref
from tests.kernels.triton_device import triton_test_device  # noqa: E402

DEVICE = triton_test_device()
_INTERPRET = DEVICE == "cpu"

from glimpse.kernels import backend, triton_norms  # noqa: E402

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp is at most 2^-7 of the value
FP16_ULP = 2.0**-10
EPS = 1e-5

# (rtol, atol) per output dtype: fp32 1e-5 relative; bf16/fp16 one ulp of the output (or 1e-2 absolute,
# for values near zero, whose relative error the rounding of the normalised value dominates)
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (BF16_ULP, 1e-2), torch.float16: (FP16_ULP, 1e-3)}


@contextlib.contextmanager
def _kernels_on_cpu():
    """Interpreter mode: let the dispatch in kernels/norms.py take the Triton path on CPU tensors (its
    dtype rule kept, the CUDA one dropped)."""
    if DEVICE == "cuda":
        yield
        return
    saved = ref.use_triton
    ref.use_triton = lambda *ts: all(t.dtype in triton_norms.DTYPES for t in ts)
    try:
        yield
    finally:
        ref.use_triton = saved


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _close(out: torch.Tensor, expect: torch.Tensor, rtol: float, atol: float, min_exact: float | None = None):
    """Assert |out - expect| <= atol + rtol |expect| everywhere (NaN fails), same dtype and shape; on CUDA,
    with `min_exact`, also that at least that fraction of the elements is bit-equal (the rounding order)."""
    assert out.dtype == expect.dtype, (out.dtype, expect.dtype)
    assert out.shape == expect.shape, (out.shape, expect.shape)
    o, e = _cpu(out).double(), _cpu(expect).double()
    assert torch.isfinite(o).all(), "non-finite output (unwritten or overflowed elements)"
    diff = (o - e).abs()
    bad = diff > atol + rtol * e.abs()
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off; max abs error {diff.max().item():.3g}"
    )
    if min_exact is not None and DEVICE == "cuda":
        exact = (diff == 0).double().mean().item()
        assert exact >= min_exact, f"only {exact:.4f} of the elements bit-equal to the reference"


def _rows(rows: int, n: int, dtype, g: torch.Generator, pad: int = 0, scale: float = 1.0) -> torch.Tensor:
    """[rows, n] on DEVICE; with pad > 0 a column slice of a [rows, n + pad] tensor (row stride n + pad)."""
    t = (scale * torch.randn(rows, n + pad, generator=g)).to(dtype).to(DEVICE)
    return t[:, :n] if pad else t


def _weight(n: int, dtype, g: torch.Generator) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype).to(DEVICE)


def _min_exact(dtype) -> float | None:
    """Bit-equal fraction expected on CUDA: only elements whose fp32 value sits within ~1e-7 of a rounding
    boundary may round the other way (the kernels sum in another order and use the hardware rsqrt)."""
    return {torch.bfloat16: 0.999, torch.float16: 0.99}.get(dtype)


# rms_norm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,n,pad,block",
    [
        (3, 64, 0, None),
        (4, 300, 5, None),  # not a power of two, strided rows
        (1, 5120, 0, None),  # 12B hidden, decode batch 1
        (6, 5120, 7, None),  # 12B hidden, strided rows
        (3, 5120, 0, 1024),  # the looped path (5 chunks)
        (2, 300, 0, 128),  # looped, ragged last chunk
    ],
)
@pytest.mark.parametrize(
    "dtype,w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_rms_norm(rows, n, pad, block, dtype, w_dtype):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = _rows(rows, n, dtype, g, pad, scale=3.0)
    w = _weight(n, w_dtype, g)
    out = triton_norms.rms_norm(x, w, EPS, block=block)
    _close(out, ref.rms_norm(_cpu(x), _cpu(w), EPS), *TOL[dtype], min_exact=_min_exact(dtype))


def test_rms_norm_fp16_and_3d():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5120, generator=g).half().to(DEVICE)
    w = _weight(5120, torch.float16, g)
    out = triton_norms.rms_norm(x, w, EPS)
    _close(out, ref.rms_norm(_cpu(x), _cpu(w), EPS), *TOL[torch.float16], min_exact=_min_exact(torch.float16))
    # a 3D view whose rows are not one stride apart (copied to rows by the wrapper)
    xt = torch.randn(3, 2, 64, generator=g).to(DEVICE).transpose(0, 1)
    w = _weight(64, torch.float32, g)
    _close(triton_norms.rms_norm(xt, w, EPS), ref.rms_norm(_cpu(xt), _cpu(w), EPS), *TOL[torch.float32])


def test_rms_norm_zero_rows_and_tiny_values():
    g = torch.Generator().manual_seed(3)
    w = _weight(64, torch.float32, g)
    assert triton_norms.rms_norm(torch.empty(0, 64, device=DEVICE), w, EPS).shape == (0, 64)
    x = torch.zeros(2, 64, device=DEVICE)
    x[1] = 1e-4 * torch.randn(64, generator=g).to(DEVICE)  # eps dominates the variance
    _close(triton_norms.rms_norm(x, w, EPS), ref.rms_norm(_cpu(x), _cpu(w), EPS), *TOL[torch.float32])


# add_rms_norm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,n,pad,block", [(3, 64, 0, None), (5, 5120, 3, None), (2, 5120, 0, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(rows, n, pad, block, dtype):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x = _rows(rows, n, dtype, g, pad, scale=4.0)
    d = _rows(rows, n, dtype, g, 0)
    w = _weight(n, dtype, g)
    x_before = x.clone()
    r, y = triton_norms.add_rms_norm(x, d, w, EPS, block=block)
    r_ref = _cpu(x) + _cpu(d)
    # the residual is one rounding of an exact fp32 sum: bit-equal on CUDA (the interpreter truncates)
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(_cpu(r), r_ref)
    else:
        _close(r, r_ref, BF16_ULP, 0.0)
    assert torch.equal(x, x_before), "x must not be modified"
    # the norm of the residual it returned (what the next block sees), and of the reference residual
    _close(y, ref.rms_norm(_cpu(r), _cpu(w), EPS), *TOL[dtype], min_exact=_min_exact(dtype))
    rtol, atol = TOL[dtype]
    if DEVICE != "cuda" and dtype != torch.float32:
        rtol = 2 * BF16_ULP  # the interpreter truncated r too
    _close(y, ref.rms_norm(r_ref, _cpu(w), EPS), rtol, atol)


# gated_rms_norm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,d_inner,groups,block",
    [
        (3, 64, 2, None),
        (2, 240, 8, None),  # groups of 30: not a power of two
        (1, 10240, 8, None),  # 12B: 8 groups of 1280, decode batch 1
        (5, 10240, 8, None),
        (2, 10240, 8, 512),  # the looped path (3 chunks per group, the last ragged)
        (2, 96, 1, None),  # one group
    ],
)
@pytest.mark.parametrize(
    "dtype,w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_gated_rms_norm(rows, d_inner, groups, block, dtype, w_dtype):
    g = torch.Generator().manual_seed(rows * 10 + d_inner + groups)
    x = _rows(rows, d_inner, dtype, g)  # contiguous, as the mixer's y.reshape(T, d_inner)
    z = _rows(rows, d_inner, dtype, g, pad=d_inner // 2 + 3, scale=2.0)  # a column slice of in_proj's output
    w = _weight(d_inner, w_dtype, g)
    out = triton_norms.gated_rms_norm(x, z, w, groups, EPS, block=block)
    expect = ref.gated_rms_norm(_cpu(x), _cpu(z), _cpu(w), groups, EPS)  # dtype: promote(w, x)
    rtol, atol = TOL[dtype]
    if DEVICE != "cuda" and dtype != torch.float32:
        rtol = 2 * BF16_ULP  # two truncations in the interpreter (normalised value, then times the weight)
    _close(out, expect, rtol, atol, min_exact=_min_exact(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_gated_rms_norm_extreme_gates():
    """Large |z|: silu saturates (exp overflows to inf for very negative z) without NaNs."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 128, generator=g).to(DEVICE)
    z = (torch.randn(2, 128, generator=g) * 60.0).to(DEVICE)
    w = _weight(128, torch.float32, g)
    out = triton_norms.gated_rms_norm(x, z, w, 4, EPS)
    _close(out, ref.gated_rms_norm(_cpu(x), _cpu(z), _cpu(w), 4, EPS), 1e-5, 1e-5)


# dispatch and the model --------------------------------------------------------------------------------


def test_reference_functions_dispatch_to_triton(monkeypatch):
    """norms.rms_norm / gated_rms_norm / add_rms_norm reach the kernels when `use_triton` says so (checked by
    counting launches), and keep the torch path with GLIMPSE_TRITON off (`backend.ENABLED` False)."""
    calls = []
    for name in ("rms_norm", "gated_rms_norm", "add_rms_norm"):
        fn = getattr(triton_norms, name)
        monkeypatch.setattr(
            triton_norms, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k)
        )
    g = torch.Generator().manual_seed(5)
    x, d, w = _rows(2, 64, torch.float32, g), _rows(2, 64, torch.float32, g), _weight(64, torch.float32, g)
    expect = (
        ref.rms_norm(_cpu(x), _cpu(w), EPS),
        ref.gated_rms_norm(_cpu(x), _cpu(d), _cpu(w), 2, EPS),
        _cpu(x) + _cpu(d),
    )
    assert calls == []  # the references ran on CPU tensors, outside the interpreter patch
    with _kernels_on_cpu():
        _close(ref.rms_norm(x, w, EPS), expect[0], 1e-5, 1e-6)
        _close(ref.gated_rms_norm(x, d, w, 2, EPS), expect[1], 1e-5, 1e-6)
        r, y = ref.add_rms_norm(x, d, w, EPS)
        assert torch.equal(_cpu(r), expect[2])
        assert calls == ["rms_norm", "gated_rms_norm", "add_rms_norm"]
        monkeypatch.setattr(backend, "ENABLED", False)
        if DEVICE == "cuda":
            ref.rms_norm(x, w, EPS)
            ref.add_rms_norm(x, d, w, EPS)
            ref.gated_rms_norm(x, d, w, 2, EPS)
            assert len(calls) == 3


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_kernels_replay_in_a_cuda_graph():
    g = torch.Generator().manual_seed(9)
    x, d, w = (
        _rows(4, 5120, torch.bfloat16, g),
        _rows(4, 5120, torch.bfloat16, g),
        _weight(5120, torch.bfloat16, g),
    )
    xm, z, wm = (
        _rows(4, 10240, torch.bfloat16, g),
        _rows(4, 10240, torch.bfloat16, g, 64),
        _weight(10240, torch.bfloat16, g),
    )
    eager = (ref.add_rms_norm(x, d, w, EPS), ref.gated_rms_norm(xm, z, wm, 8, EPS))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (ref.add_rms_norm(x, d, w, EPS), ref.gated_rms_norm(xm, z, wm, 8, EPS))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0][0], eager[0][0]) and torch.equal(out[0][1], eager[0][1])
    assert torch.equal(out[1], eager[1])


def _plain_forward(model, batch, cache, input_ids):
    """NemotronH as written before the fusion: hidden = block(hidden) = hidden + mixer(norm(hidden))."""
    hidden = model.embed(input_ids)
    for layer in model.backbone.layers:
        hidden = layer(hidden, batch, cache)
    return model.lm_head(model.backbone.norm_f(hidden[batch.last_token_indices()]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_fused_norms_matches_plain_blocks(dtype):
    """The tiny NemotronH: prefill of two prompts, then two decode steps, its forward (residual add fused
    with the next norm, Triton norms) against the plain block loop on CPU with the torch norms."""
    from glimpse.engine.cache import allocate_cache_tensors
    from glimpse.model.batch import ForwardBatch
    from glimpse.model.nemotron_h import NemotronHForCausalLM
    from glimpse.model.tiny import tiny_text_config

    config = tiny_text_config()
    torch.manual_seed(4)
    model = NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.rand_like(p))
            elif p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(6)
    steps = [([5, 3], [0, 0])] + [([1, 1], [5 + i, 3 + i]) for i in range(2)]
    ids = [torch.randint(0, config.vocab_size, (sum(q),), generator=gen) for q, _ in steps]
    slots, tables = torch.tensor([3, 1]), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])

    def run(dev, forward):
        m = model.to(dev)
        cache = allocate_cache_tensors(config, 4, 8, 4, dtype, torch.float32, dev)
        cache.conv_state.zero_()
        cache.ssm_state.zero_()
        out = []
        with torch.no_grad():
            for (q, c), x in zip(steps, ids):
                batch = ForwardBatch(q, c, slots.to(dev), tables.to(dev))
                out.append(_cpu(forward(m, batch, cache, x.to(dev))).float())
        return torch.cat(out)

    expect = run("cpu", _plain_forward)
    with _kernels_on_cpu():
        got = run(DEVICE, lambda m, b, c, x: m(b, c, input_ids=x))
    # on the CPU only the norms differ (reduction order); on CUDA every kernel does (cuBLAS, Triton SSM)
    rtol = {torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3, torch.bfloat16: 5e-2}[dtype]
    err = ((got - expect).abs().max() / expect.abs().max()).item()
    assert err <= rtol, f"logits differ by {err:.2e} of the largest"
