"""``moetrt::SparseMoE(x, weights, indices, w_gate_up, w_down) -> y``: the routed experts.

Semantics (DESIGN.md, domain ``moetrt`` version 1)::

    x          [T, D]        model dtype
    weights    [T, K]        float32, from TopKRouting
    indices    [T, K]        int32,   from TopKRouting
    w_gate_up  [E, 2F, D]    gate rows then up rows (HF transformers v5 layout)
    w_down     [E, D, F]
    y[t] = sum_j weights[t, j] * down_e(act(gate_e x_t) * up_e x_t),   e = indices[t, j]
    act = silu (SwiGLU)

Work is proportional to T*K, not T*E: the (token, slot) pairs are sorted once by expert and
each expert multiplies only the rows routed to it. The routing weight multiplies in float32
and the product is cast back to the model dtype before the sum, as transformers does.

Shared experts are not part of this op; they stay ordinary dense layers beside it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["sparse_moe", "sparse_moe_eager", "sparse_moe_reference", "OP_NAME", "ACTIVATIONS"]

OP_NAME = "SparseMoE"
ACTIVATIONS = ("silu",)


def _check(x, weights, indices, w_gate_up, w_down, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"SparseMoE: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"SparseMoE: x must be [T, D], got shape {tuple(x.shape)}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(
            f"SparseMoE: w_gate_up must be [E, 2F, D] and w_down [E, D, F], got "
            f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}"
        )
    num_tokens, dim = x.shape
    num_experts, two_f, dim_gu = w_gate_up.shape
    if two_f % 2 or dim_gu != dim or tuple(w_down.shape) != (num_experts, dim, two_f // 2):
        raise ValueError(
            f"SparseMoE: weight shapes disagree with x [T={num_tokens}, D={dim}]: w_gate_up "
            f"{tuple(w_gate_up.shape)} (want [E, 2F, {dim}]), w_down {tuple(w_down.shape)} (want [E, {dim}, F])"
        )
    if weights.dim() != 2 or tuple(indices.shape) != tuple(weights.shape) or weights.shape[0] != num_tokens:
        raise ValueError(
            f"SparseMoE: weights and indices must both be [T={num_tokens}, K], got "
            f"{tuple(weights.shape)} and {tuple(indices.shape)}"
        )
    if weights.dtype != torch.float32:
        raise ValueError(f"SparseMoE: routing weights must be float32, got {weights.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"SparseMoE: indices must be int32 or int64, got {indices.dtype}")
    if x.dtype != w_gate_up.dtype or x.dtype != w_down.dtype:
        raise ValueError(
            f"SparseMoE: x, w_gate_up and w_down must share one dtype, got {x.dtype}, "
            f"{w_gate_up.dtype}, {w_down.dtype}"
        )


def sparse_moe_eager(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The op in plain differentiable PyTorch, tokens grouped by expert."""
    num_tokens, k = indices.shape
    num_experts = w_gate_up.shape[0]
    ffn = w_down.shape[2]
    flat_experts = indices.reshape(-1).long()  # [T*K]
    order = torch.argsort(flat_experts, stable=True)  # [T*K] (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()  # E ints
    flat_weights = weights.reshape(-1)  # [T*K]
    y = torch.zeros_like(x)  # [T, D]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]  # [n] indices into the flattened [T*K]
        start += count
        tokens = pairs // k  # [n]
        gate_up = F.linear(x[tokens], w_gate_up[expert])  # [n, 2F]
        hidden = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]  # [n, F]
        out = F.linear(hidden, w_down[expert])  # [n, D]
        out = (out.float() * flat_weights[pairs, None]).to(x.dtype)  # weight in fp32, as transformers
        y = y.index_add(0, tokens, out)
    return y


@torch.library.custom_op("moetrt::SparseMoE", mutates_args=())
def sparse_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Apply the routed experts to ``x``; only the (token, expert) pairs in ``indices`` are computed."""
    _check(x, weights, indices, w_gate_up, w_down, activation)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= w_gate_up.shape[0]):
        raise ValueError(
            f"SparseMoE: indices must lie in 0..E-1={w_gate_up.shape[0] - 1}, got "
            f"{int(indices.min())}..{int(indices.max())}"
        )
    return sparse_moe_eager(x, weights, indices, w_gate_up, w_down, activation)


@sparse_moe.register_fake
def _(x, weights, indices, w_gate_up, w_down, activation="silu"):
    _check(x, weights, indices, w_gate_up, w_down, activation)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, weights, indices, w_gate_up, w_down, activation = inputs
    ctx.save_for_backward(x, weights, indices, w_gate_up, w_down)
    ctx.activation = activation


def _backward(ctx, grad_y):
    x, weights, indices, w_gate_up, w_down = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weights, w_gate_up, w_down)]
        y = sparse_moe_eager(leaves[0], leaves[1], indices, leaves[2], leaves[3], ctx.activation)
        gx, gw, ggu, gd = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    return gx, gw, None, ggu, gd, None


sparse_moe.register_autograd(_backward, setup_context=_setup_context)


def sparse_moe_reference(
    x: np.ndarray,
    weights: np.ndarray,
    indices: np.ndarray,
    w_gate_up: np.ndarray,
    w_down: np.ndarray,
    activation: str = "silu",
) -> np.ndarray:
    """NumPy float64 reference: a plain loop over (token, slot), returned in x's dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out_dtype = np.asarray(x).dtype
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    w_gate_up, w_down = np.asarray(w_gate_up, np.float64), np.asarray(w_down, np.float64)
    ffn = w_down.shape[2]
    y = np.zeros_like(x)
    for t in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate_up = w_gate_up[e] @ x[t]
            gate, up = gate_up[:ffn], gate_up[ffn:]
            hidden = gate / (1.0 + np.exp(-gate)) * up
            y[t] += weights[t, j] * (w_down[e] @ hidden)
    return y.astype(out_dtype)
