"""Degenerate equivalences of the reference model that hold whatever transformers does.

- one expert with top-1 is a dense SwiGLU feed-forward;
- k = E with renormalised softmax is the softmax-weighted mixture of every expert;
- a left-padded batch equals its rows run one by one;
- prefill + decode through the KV cache (in any chunking) equals one full forward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moetrt import MoEConfig, MoETransformer

# NOTE: the same fp32 math at different batch/sequence shapes sums in a different order.
REL_TOL = 1e-5

TINY = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts=4, num_experts_per_tok=2, intermediate_size=24, rope_theta=10000.0, max_position_embeddings=128,
)
# named configurations covering the options of the reference model
CONFIGS = {
    "mixtral": dict(),
    "window": dict(sliding_window=4),
    "shared-dense": dict(num_hidden_layers=3, shared_expert_intermediate_size=40, mlp_only_layers=(0,),
                         dense_intermediate_size=20, normalize_topk=False, model_type="qwen2_moe"),
    "head-norm": dict(qk_norm="head", head_dim=12, attention_bias=True, attention_out_bias=True,
                      model_type="qwen3_moe"),
    "full-norm-clip": dict(qk_norm="full", clip_qkv=0.5, normalize_topk=False, model_type="olmoe"),
    "sigmoid-scaled": dict(scoring="sigmoid", routed_scaling_factor=2.5, num_experts=6, num_experts_per_tok=3),
}
# (lengths of the rows of a left-padded batch), decode steps afterwards
PADDED = [([3, 9], 2), ([1, 12, 7], 3)]
# prompt length, then the sizes of the chunks fed through the cache
CHUNKINGS = [(1, [1, 1, 1]), (6, [1, 1, 1, 1]), (5, [3, 1, 4]), (10, [10])]


def _model(name: str, seed: int = 0, **overrides) -> MoETransformer:
    cfg = MoEConfig(**{**TINY, **CONFIGS[name], **overrides})
    model = MoETransformer.from_config(cfg, seed=seed, std=0.15)
    with torch.no_grad():  # norm weights away from 1, so a misplaced norm shows
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
    return model


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


# --- one expert, top-1 == dense FFN ----------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_one_expert_top1_block_is_dense_swiglu(normalize):
    model = _model("mixtral", num_experts=1, num_experts_per_tok=1, normalize_topk=normalize)
    block = model.layers[0].mlp
    gate_up, down = block.experts.gate_up_proj[0], block.experts.down_proj[0]  # [2F, D], [D, F]
    x = torch.randn(2, 5, TINY["hidden_size"])
    with torch.no_grad():
        y, (_, weights, indices) = block(x)
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        dense = (F.silu(gate) * up) @ down.T
    assert torch.equal(indices, torch.zeros_like(indices))
    assert torch.equal(weights, torch.ones_like(weights))  # softmax over one expert is exactly 1
    assert _rel(y, dense) <= REL_TOL


def test_one_expert_top1_model_equals_model_with_dense_layer():
    """End to end: a model whose layer 0 is a dense FFN computes what the 1-expert MoE layer computes."""
    moe = _model("mixtral", num_experts=1, num_experts_per_tok=1, num_hidden_layers=3)
    dense = MoETransformer(dataclasses.replace(moe.config, mlp_only_layers=(0,)))
    assert not dense.layers[0].is_moe and dense.layers[1].is_moe
    state = moe.state_dict()
    ffn = TINY["intermediate_size"]
    gate_up, down = state.pop("layers.0.mlp.experts.gate_up_proj")[0], state.pop("layers.0.mlp.experts.down_proj")[0]
    del state["layers.0.mlp.gate.weight"]
    state.update({
        "layers.0.mlp.gate_proj.weight": gate_up[:ffn], "layers.0.mlp.up_proj.weight": gate_up[ffn:],
        "layers.0.mlp.down_proj.weight": down,
    })
    dense.load_state_dict(state, strict=True)
    dense.eval()
    ids = _ids(2, 11)
    with torch.no_grad():
        assert _rel(dense(ids).logits, moe(ids).logits) <= REL_TOL


# --- k = E == softmax mixture of all experts -------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_all_experts_equal_softmax_weighted_mixture(normalize):
    model = _model("mixtral", num_experts=5, num_experts_per_tok=5, normalize_topk=normalize)
    block = model.layers[1].mlp
    x = torch.randn(3, 7, TINY["hidden_size"])
    with torch.no_grad():
        y, (router_logits, weights, _) = block(x)
        probs = torch.softmax(x.reshape(-1, TINY["hidden_size"]) @ block.gate.weight.T, dim=-1)  # [T, E]
        gate_up = torch.einsum("td,efd->tef", x.reshape(-1, TINY["hidden_size"]), block.experts.gate_up_proj)
        ffn = TINY["intermediate_size"]
        hidden = F.silu(gate_up[..., :ffn]) * gate_up[..., ffn:]  # [T, E, F]
        outs = torch.einsum("tef,edf->ted", hidden, block.experts.down_proj)  # [T, E, D]
        mixture = (probs[..., None] * outs).sum(1).view_as(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(21), rtol=1e-6, atol=1e-6)
    assert _rel(y, mixture) <= REL_TOL


# --- padded batch == rows alone ------------------------------------------------------------------
def _left_padded(lengths, seed):
    seq = max(lengths)
    ids = _ids(len(lengths), seq, seed=seed)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, seq - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("lengths,steps", PADDED, ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padded_batch_equals_rows_alone(name, lengths, steps):
    model = _model(name)
    ids, mask, positions = _left_padded(lengths, seed=len(lengths))
    next_ids = _ids(len(lengths), steps, seed=42)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions)
        batch_logits = [out.logits]
        cache = out.past_key_values
        for step in range(steps):
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            positions = positions[:, -1:] + 1
            out = model(next_ids[:, step : step + 1], attention_mask=mask, position_ids=positions, past_key_values=cache)
            cache = out.past_key_values
            batch_logits.append(out.logits)
        batched = torch.cat(batch_logits, dim=1)  # [B, S + steps, V]
        seq = max(lengths)
        for b, n in enumerate(lengths):
            row = torch.cat((ids[b, seq - n :], next_ids[b]))[None]  # [1, n + steps]
            alone = model(row).logits[0]  # [n + steps, V]
            assert _rel(batched[b, seq - n :], alone) <= REL_TOL, f"row {b}"


# --- cache == full forward -------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,chunks", CHUNKINGS, ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name, prompt, chunks):
    model = _model(name)
    total = prompt + sum(chunks)
    ids = _ids(2, total, seed=total)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # [B, total, V]
        out = model(ids[:, :prompt])
        pieces, cache, start = [out.logits], out.past_key_values, prompt
        for size in chunks:
            out = model(ids[:, start : start + size], past_key_values=cache)
            cache, start = out.past_key_values, start + size
            pieces.append(out.logits)
    cfg = model.config
    assert [tuple(k.shape) for k, _ in cache] == [(2, cfg.num_key_value_heads, total, cfg.head_dim)] * cfg.num_hidden_layers
    assert _rel(torch.cat(pieces, dim=1), full) <= REL_TOL


def test_cache_with_attention_mask_of_ones_equals_no_mask():
    model = _model("window")
    ids = _ids(2, 9)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(9).expand(2, 9)).logits
    assert torch.equal(a, b)
