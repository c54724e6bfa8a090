"""One MoE layer on its own, exported as full models are: for benchmarks and pass tests.

``x [T, D] -> y [T, D]``: the router (a MatMul), ``moetrt::TopKRouting`` and ``moetrt::SparseMoE``
with its function body, T dynamic.
"""

from __future__ import annotations

import os

import torch

from moetrt.config import MoEConfig
from moetrt.model import MoEBlock

from .onnx_from_torch import DEFAULT_OPSET, attach_functions, trace_to_onnx

__all__ = ["onnx_moe_layer"]


class _Layer(torch.nn.Module):
    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

    def forward(self, x):  # [T, D] -> [T, D]
        return self.block(x[None])[0][0]


def onnx_moe_layer(
    path: str | os.PathLike,
    num_experts: int = 8,
    dim: int = 128,
    ffn: int = 192,
    k: int = 2,
    *,
    normalize: bool = True,
    seed: int = 0,
    std: float = 0.1,
    opset: int = DEFAULT_OPSET,
) -> MoEBlock:
    """Write one random MoE layer (weights normal(0, ``std``), seeded) to ``path``; returns its torch block."""
    import onnx_ir as ir

    cfg = MoEConfig(
        vocab_size=16, hidden_size=dim, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        num_experts=num_experts, num_experts_per_tok=k, intermediate_size=ffn, normalize_topk=normalize,
    )
    block = MoEBlock(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, std, generator=generator)
    model = trace_to_onnx(
        _Layer(block).eval(), (torch.randn(7, dim),), ({0: torch.export.Dim.DYNAMIC},), ["x"], ["y"], opset
    )
    attach_functions(model, num_experts)
    ir.save(model, path)
    return block.eval()
