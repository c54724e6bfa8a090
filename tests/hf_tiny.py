"""Tiny random Hugging Face MoE models of every supported family, for tests of every stage.

``hf_tiny_model("qwen2_moe-shared")`` builds a seeded, eval-mode, fp32 transformers model
with eager attention. Weights are drawn with a non-trivial std (router logits of order 1) and
norm weights away from 1, so routing is not near-uniform and a swapped norm or a missing bias
shows in the logits. ``VARIANTS`` lists the named configurations; each exercises options of
its family (shared expert, dense layers, q/k norm, clip_qkv, tied embeddings, ...).

Import it from a test as ``from tests.hf_tiny import ...`` or use the ``hf_tiny_model`` fixture.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "FAMILIES", "VARIANTS", "FAMILY_OF", "hf_tiny_config", "hf_tiny_model", "hf_forward", "randomize_",
    "left_padded", "rel_err",
]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# shared by every variant unless overridden: D=64, 3 layers, H=4, G=2, E=6, K=2, V=96
_BASE: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

# variant name -> (family, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", dict(num_local_experts=6, intermediate_size=48)),
    "mixtral-tied": ("mixtral", dict(num_local_experts=4, intermediate_size=40, tie_word_embeddings=True)),
    "mixtral-window": ("mixtral", dict(num_local_experts=4, intermediate_size=40, sliding_window=5)),
    # shared expert on every MoE layer, MoE only on odd layers (1), softmax weights not renormalised
    "qwen2_moe-shared": ("qwen2_moe", dict(
        num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=80, intermediate_size=56,
        decoder_sparse_step=2, norm_topk_prob=False, num_hidden_layers=4,
    )),
    # layer 0 dense through mlp_only_layers, renormalised top-k, top-3 of 8
    "qwen2_moe-dense0": ("qwen2_moe", dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        intermediate_size=72, mlp_only_layers=[0], norm_topk_prob=True,
    )),
    # per-head q/k norm, head_dim 24 != hidden/heads (16)
    "qwen3_moe": ("qwen3_moe", dict(
        num_experts=8, moe_intermediate_size=32, intermediate_size=64, head_dim=24, norm_topk_prob=True,
    )),
    "qwen3_moe-bias": ("qwen3_moe", dict(
        num_experts=5, moe_intermediate_size=32, intermediate_size=64, attention_bias=True, norm_topk_prob=False,
        mlp_only_layers=[2],
    )),
    # full-width q/k norm and clipped q/k/v
    "olmoe": ("olmoe", dict(num_experts=6, intermediate_size=32, clip_qkv=0.6, norm_topk_prob=False)),
    "olmoe-norm": ("olmoe", dict(num_experts=4, intermediate_size=32, norm_topk_prob=True, attention_bias=True)),
}
FAMILY_OF = {name: family for name, (family, _) in VARIANTS.items()}


def hf_tiny_config(variant: str, **overrides: Any):
    """The transformers config of a variant (a family name is its base variant)."""
    import transformers

    if variant not in VARIANTS:
        raise KeyError(f"unknown tiny variant {variant!r}; choose one of {sorted(VARIANTS)}")
    family, extra = VARIANTS[variant]
    cls = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
    }[family]
    kwargs = {**_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **extra, **overrides}
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("eos_token_id", 2)
    kwargs.setdefault("pad_token_id", 0)
    return cls(attn_implementation="eager", **kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Redraw every parameter: normal(0, std); norm weights 1 + normal(0, 0.1). In place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return model


def hf_tiny_model(variant: str, seed: int = 0, std: float = 0.1, **overrides: Any):
    """A seeded random transformers causal LM of ``variant``: fp32, eager attention, eval mode."""
    import transformers

    config = hf_tiny_config(variant, **overrides)
    torch.manual_seed(seed)
    # eager attention and the eager per-expert loop: transformers' plainest code paths
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    return randomize_(model, seed=seed, std=std).eval()


def hf_forward(model, input_ids, attention_mask=None, position_ids=None, cache=None):
    """One transformers forward with a KV cache: returns (logits [B, S, V], cache).

    transformers 5.x names the cache argument and output ``cache`` (earlier: ``past_key_values``).
    """
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **{name: cache},
        )
    return out.logits, getattr(out, "cache", None) or out.past_key_values


def left_padded(lengths: list[int], seq: int, vocab: int, seed: int = 0, pad_id: int = 0):
    """A left-padded batch as ``generate`` builds it: (input_ids, attention_mask, position_ids), [B, seq] each.

    Row ``b`` holds ``lengths[b]`` real tokens at the right end; positions count real tokens
    (``cumsum(mask) - 1``, clamped at 0 on padding).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (len(lengths), seq), generator=generator)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        assert 1 <= n <= seq
        mask[b, seq - n :] = 1
    input_ids = input_ids.masked_fill(mask == 0, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|, computed in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
