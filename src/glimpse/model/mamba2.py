"""The Mamba2 mixer of NemotronH (MODEL_SPEC.md §1), written for packed serving batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.config import NemotronHConfig
from glimpse.distributed.group import SINGLE, TPGroup
from glimpse.kernels.causal_conv1d import causal_conv1d_update_silu, causal_conv1d_varlen_silu
from glimpse.kernels.norms import gated_rms_norm
from glimpse.kernels.ssd import selective_state_update_fused_dt, ssd_chunk_scan_varlen
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.parallel import Split, cols, linear_splits


class _GroupedNorm(nn.Module):
    """Holds `norm.weight`; the maths is gated_rms_norm (gate first, then a norm per group)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Mamba2Mixer(nn.Module):
    def __init__(self, config: NemotronHConfig, mamba_index: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.mamba_index = mamba_index  # which slice of the state pools this layer owns
        self.tp = tp  # this rank holds heads heads·rank.. and groups groups·rank.. (model/parallel.py)
        self.total_heads, self.total_groups = config.mamba_num_heads, config.n_groups
        self.heads = config.mamba_num_heads // tp.size
        self.head_dim = config.mamba_head_dim
        self.groups = config.n_groups // tp.size
        self.state_size = config.ssm_state_size
        self.d_inner = self.heads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.groups * self.state_size
        self.chunk_size = config.chunk_size
        self.eps = config.layer_norm_epsilon
        self.dt_min, self.dt_max = config.time_step_limit
        self.in_proj = nn.Linear(
            config.hidden_size, self.d_inner + self.conv_dim + self.heads, bias=config.mamba_proj_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=config.use_conv_bias
        )
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.norm = _GroupedNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self._A_cache: tuple | None = None

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log) in fp32, computed once per weight version (three kernels per layer per step
        otherwise); a decode graph captures the cached tensor's address, which stays put."""
        key = (self.A_log.data_ptr(), self.A_log._version, self.A_log.device)
        if self._A_cache is None or self._A_cache[0] != key:
            self._A_cache = (key, -torch.exp(self.A_log.detach().float()))
        return self._A_cache[1]

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_min > 0 or math.isfinite(self.dt_max):
            dt = dt.clamp(self.dt_min, self.dt_max)
        return dt

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        conv_state = cache.conv_state[self.mamba_index]
        ssm_state = cache.ssm_state[self.mamba_index]
        weight = self.conv1d.weight.squeeze(1)  # [C, K]
        A = self._A()

        if batch.is_decode:  # one fused pass each for conv + silu and for softplus(dt) + the state update
            xBC = causal_conv1d_update_silu(xBC, weight, self.conv1d.bias, conv_state, batch.state_slots)
        else:
            dt = self._dt(dt)
            cu = batch.cu_query_lens_list
            slots = batch.slots_list
            cu_t, init_t, _ = batch.prefill_tensors()
            xBC = causal_conv1d_varlen_silu(
                xBC, weight, self.conv1d.bias, conv_state, cu_t, batch.state_slots, init_t
            )
        x, B, C = xBC.split([self.d_inner, self.groups * self.state_size, self.groups * self.state_size], -1)
        T = x.shape[0]
        x = x.view(T, self.heads, self.head_dim)
        B = B.view(T, self.groups, self.state_size)
        C = C.view(T, self.groups, self.state_size)

        if batch.is_decode:
            y = selective_state_update_fused_dt(
                x, dt, self.dt_bias, A, B, C, self.D, ssm_state, batch.state_slots, (self.dt_min, self.dt_max)
            )
        else:
            y = ssd_chunk_scan_varlen(
                x, dt, A, B, C, self.D, ssm_state, cu, slots, batch.has_initial_state, self.chunk_size
            )
        y = gated_rms_norm(y.reshape(T, self.d_inner), z, self.norm.weight, self.groups, self.eps)
        return self.tp.all_reduce(self.out_proj(y))

    def tp_splits(self) -> dict[str, Split]:
        """in_proj is z | x | B | C | dt and conv1d x | B | C on disk: each component splits on its own."""
        r, n = self.tp.rank, self.state_size
        inner, bc = self.d_inner, self.groups * n  # this rank's widths
        full_inner, full_bc = self.total_heads * self.head_dim, self.total_groups * n
        x = (r * inner, inner)
        b = (full_inner + r * bc, bc)
        c = (full_inner + full_bc + r * bc, bc)
        conv_full = full_inner + 2 * full_bc
        in_pieces = ((r * inner, inner), (full_inner + x[0], inner), (full_inner + b[0], bc),
                     (full_inner + c[0], bc), (full_inner + conv_full + r * self.heads, self.heads))  # fmt: skip
        in_split = Split(0, in_pieces, full_inner + conv_full + self.total_heads)
        conv = Split(0, (x, b, c), conv_full)
        by_head = Split(0, ((r * self.heads, self.heads),), self.total_heads)
        bias = self.out_proj.bias is not None
        out = linear_splits("in_proj", in_split, r, self.in_proj.bias is not None)
        out |= linear_splits("out_proj", cols(r * inner, inner, full_inner), r, bias)
        out |= {"conv1d.weight": conv, "A_log": by_head, "D": by_head, "dt_bias": by_head}
        out["norm.weight"] = Split(0, (x,), full_inner)
        if self.conv1d.bias is not None:
            out["conv1d.bias"] = conv
        return out
