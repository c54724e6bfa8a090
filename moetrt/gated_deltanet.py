"""The Gated DeltaNet layer (linear attention) of the hybrid Qwen3-Next / Qwen3.5-MoE models, in plain PyTorch.

Shape legend: B batch, S new tokens, D model dim, Hk query/key heads, Hv value heads (a multiple
of Hk), Dk key head dim, Dv value head dim, C = 2 Hk Dk + Hv Dv conv channels, W conv width
(``linear_conv_kernel_dim``).

A step of the layer, as transformers computes it (``modeling_qwen3_next.py``, ``modeling_qwen3_5_moe.py``):

1. padded positions of the input are zeroed (``apply_mask_to_padding_states``), so a left-padded
   row leaves the states as an unpadded one would;
2. q/k/v come from one projection through a causal depthwise conv (width W, SiLU) whose last
   W - 1 inputs are the **conv state** ``[B, C, W-1]``;
3. the gated delta rule updates the **recurrent state** ``[B, Hv, Dk, Dv]`` (float32) per token:
   ``S = S * exp(g)``, ``S += k (beta (v - S^T k))^T``, ``out = S^T q`` with q, k L2-normalised and
   q scaled by ``Dk^-0.5``, ``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``;
4. the output is RMS-normalised per head, gated by ``silu(z)`` and projected back.

Prefill runs the chunked form (the UT transform over chunks of 64 tokens), a one-token step with a
state the recurrent form, both op for op as transformers' torch fallbacks. An ONNX export traces
the recurrent form as a ``Scan`` over the tokens, so one graph of standard ops serves prefill and
decode. Qwen3-Next's checkpoints store q/k/v/z and b/a fused and grouped per key head; the family
module regroups them into this layer's ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``
(Qwen3.5-MoE's layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedDeltaNet", "GatedRMSNorm", "chunk_gated_delta_rule", "recurrent_gated_delta_rule",
           "scan_gated_delta_rule"]

CHUNK_SIZE = 64  # transformers' chunk_size
L2NORM_EPS = 1e-6  # transformers' l2norm eps (FLA's)


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim, then times ``silu(gate)`` (float32 math)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(dtype)
        return (out * F.silu(gate.float())).to(dtype)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def _prepare(q, k, v, g, beta):
    """[B, S, H, d] inputs -> float32 [B, Hv, S, d] with Hk heads repeated to Hv, q/k normalised.

    Each form then scales q by ``Dk^-0.5`` the way transformers' does (a product or a quotient).
    """
    hk, hv = k.shape[2], v.shape[2]
    if hk != hv:
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))
    q, k = _l2norm(q), _l2norm(k)
    return q, k, v, g, beta  # [B, Hv, S, Dk] x2, [B, Hv, S, Dv], [B, Hv, S] x2


def recurrent_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [B, S, Hk, Dk]; v [B, S, Hv, Dv]; g, beta [B, S, Hv]; state float32 [B, Hv, Dk, Dv].

    Returns (out [B, S, Hv, Dv] in v's dtype, new state float32 [B, Hv, Dk, Dv]).
    """
    dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    q = q / q.shape[-1] ** 0.5
    state = state.to(v)
    out = torch.zeros_like(v)  # [B, Hv, S, Dv]
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        memory = (state * k[:, :, t, :, None]).sum(dim=-2)  # [B, Hv, Dv]: what the state predicts for k
        delta = (v[:, :, t] - memory) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dtype), state


def scan_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent form as one ``scan`` over the tokens (exports as ONNX ``Scan``); same arguments and results."""
    from torch._higher_order_ops.scan import scan

    dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    q = q / q.shape[-1] ** 0.5

    def step(s, xs):  # s [B, Hv, Dk, Dv]; one token of each input, the sequence axis removed
        q_t, k_t, v_t, g_t, b_t = xs
        s = s * g_t.exp()[..., None, None]
        delta = (v_t - (s * k_t[..., None]).sum(dim=-2)) * b_t[..., None]  # [B, Hv, Dv]
        s = s + k_t[..., None] * delta[..., None, :]
        return s, (s * q_t[..., None]).sum(dim=-2)  # [B, Hv, Dv]

    state, out = scan(step, state.to(v), (q, k, v, g, beta), dim=2)  # out [B, Hv, S, Dv]: stacked along dim
    return out.transpose(1, 2).contiguous().to(dtype), state


def chunk_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None,
                           chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form (the UT transform within chunks, a scan over chunks); same arguments and results."""
    dtype = q.dtype
    batch, seq = q.shape[:2]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    q = q * q.shape[-1] ** -0.5
    heads, dk, dv = v.shape[1], k.shape[-1], v.shape[-1]
    pad = (chunk_size - seq % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    # [B, Hv, N, L, d]: N chunks of L = chunk_size tokens
    q, k, k_beta, v_beta = (x.reshape(batch, heads, -1, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(batch, heads, -1, chunk_size).cumsum(dim=-1)  # [B, Hv, N, L]: log decay since the chunk start
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [B, Hv, N, L, L]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # unit lower-triangular with the identity added
    intra = (q @ k.transpose(-1, -2)) * decay
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)  # [B, Hv, N, L, Dv]
    k_decayed = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None], upper=False, unitriangular=True)
    s = (torch.zeros(batch, heads, dk, dv, dtype=v.dtype, device=v.device) if state is None else state.to(v))
    out = torch.zeros_like(values)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]  # [B, Hv, N, 1, 1]
    for i in range(q.shape[2]):
        v_new = values[:, :, i] - k_decayed[:, :, i] @ s  # [B, Hv, L, Dv]
        out[:, :, i] = q[:, :, i] @ s + intra[:, :, i] @ v_new
        s = s * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, -1, dv)[:, :, :seq]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), s


class GatedDeltaNet(nn.Module):
    """The token mixer of a ``linear_attention`` layer; parameter names follow transformers' Qwen3.5-MoE."""

    def __init__(self, cfg):
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.width = cfg.linear_conv_kernel_dim
        channels = cfg.linear_conv_dim
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, channels, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.hv, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.hv, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, self.width, groups=channels, bias=False)  # weight [C, 1, W]
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None):
        # x [B, S, D]; padding [B, S] (1 = real token) or None; past (conv [B, C, W-1], recurrent fp32 [B, Hv, Dk, Dv])
        batch, seq, _ = x.shape
        if padding is not None:  # padded positions must not reach the states
            x = (x * padding[:, :, None]).to(x.dtype)
        mixed = self.in_proj_qkv(x).transpose(1, 2)  # [B, C, S]
        z = self.in_proj_z(x).view(batch, seq, self.hv, self.dv)
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [B, S, Hv] x2
        if past is None:
            conv_past = mixed.new_zeros(batch, mixed.shape[1], self.width - 1)
            recurrent = None
        else:
            conv_past, recurrent = past
        window = torch.cat((conv_past.to(mixed.dtype), mixed), dim=-1)  # [B, C, W-1+S]
        conv_present = window[:, :, window.shape[-1] - (self.width - 1):]  # [B, C, W-1]
        weight, channels = self.conv1d.weight, mixed.shape[1]  # [C, 1, W]
        if past is None:  # the conv's own zero padding, as transformers' prefill (bitwise: another conv kernel)
            mixed = F.conv1d(mixed.to(weight.dtype), weight, padding=self.width - 1, groups=channels)[:, :, :seq]
        else:
            mixed = F.conv1d(window.to(weight.dtype), weight, groups=channels)
        mixed = F.silu(mixed).to(x.dtype)  # [B, C, S]
        q, k, v = mixed.transpose(1, 2).split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        q = q.reshape(batch, seq, self.hk, self.dk)
        k = k.reshape(batch, seq, self.hk, self.dk)
        v = v.reshape(batch, seq, self.hv, self.dv)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [B, S, Hv] fp32, <= 0
        if torch.compiler.is_exporting():  # one graph for prefill and decode: a Scan over the tokens
            if recurrent is None:
                recurrent = torch.zeros(batch, self.hv, self.dk, self.dv, dtype=torch.float32, device=x.device)
            out, state = scan_gated_delta_rule(q, k, v, g, beta, recurrent)
        elif recurrent is not None and seq == 1:
            out, state = recurrent_gated_delta_rule(q, k, v, g, beta, recurrent)
        else:
            out, state = chunk_gated_delta_rule(q, k, v, g, beta, recurrent)
        out = self.norm(out.reshape(-1, self.dv), z.reshape(-1, self.dv))  # [B*S*Hv, Dv]
        out = self.out_proj(out.reshape(batch, seq, self.value_dim))  # [B, S, D]
        return out, (conv_present, state.float())
