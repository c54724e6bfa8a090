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
    "left_padded", "rel_err", "edited_checkpoint", "save_mxfp4_checkpoint", "save_fp8_checkpoint",
    "fp8_quantized_names", "hf_greedy", "greedy_tokens_of", "reference_and_export", "assert_save_round_trips",
]

from moetrt import families as _families

FAMILIES = _families.SUPPORTED_MODEL_TYPES

# variant name -> (family, overrides of the family's tiny_config); each family module declares its own
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = _families.tiny_variants()
FAMILY_OF = {name: family for name, (family, _) in VARIANTS.items()}


def hf_tiny_config(variant: str, **overrides: Any):
    """The transformers config of a variant (a family name is its base variant)."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown tiny variant {variant!r}; choose one of {sorted(VARIANTS)}")
    family, extra = VARIANTS[variant]
    return _families.get(family).tiny_config(**{**extra, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Redraw every parameter: normal(0, std); norm weights 1 + normal(0, 0.1); DeepSeek's selection bias
    buffers normal(0, 2 std); Gemma 4's router scale sqrt(D) (1 + normal(0, 0.1)), per-expert scale
    1 + normal(0, 0.3) and layer_scalar buffers 1 + normal(0, 0.2). In place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight") or name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
                param.copy_(1.0 + 0.1 * noise)  # DBRX names its norms norm_1 / norm_2 / norm_f
            elif name.endswith("router.scale"):  # Gemma 4: times D^-1/2 in the router, so logits of order 1
                param.copy_(param.numel() ** 0.5 * (1.0 + 0.1 * noise))
            elif name.endswith("per_expert_scale"):  # Gemma 4: away from 1 so an unscaled expert shows
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(std * noise)
        for name, buf in model.named_buffers():
            # DeepSeek's e_score_correction_bias: a learned buffer; large enough to change which experts win
            if name.endswith("e_score_correction_bias"):
                buf.copy_(2 * std * torch.randn(buf.shape, generator=generator, dtype=torch.float32))
            # Gemma 4's layer_scalar: a loaded buffer (ones at init); away from 1 so a missing one shows
            if name.endswith("layer_scalar"):
                buf.copy_(1.0 + 0.2 * torch.randn(buf.shape, generator=generator, dtype=torch.float32))
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


def edited_checkpoint(hf_model, folder, edit: dict[str, Any], nested: bool = False):
    """``hf_model.save_pretrained(folder)`` with ``edit`` written over its config.json (with ``nested``, a dict value
    updates the nested dict of that name instead of replacing it); returns ``folder`` (e.g. a checkpoint moetrt
    should refuse)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    hf_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        if nested and isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|, computed in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def save_mxfp4_checkpoint(hf_model, folder, variant: str = "gpt_oss", **overrides):
    """Save ``hf_model`` as the released checkpoints store it: expert matrices as MXFP4 blocks + scales.

    ``hf_model`` must be a gpt-oss model of ``variant`` (with ``overrides``). Returns a transformers model
    holding the dequantized expert weights (what the checkpoint holds), transformers' own dequantization.
    """
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    from moetrt.mxfp4 import quantize_mxfp4

    hf_model.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    reference = hf_tiny_model(variant, **overrides)  # the same architecture; its weights are replaced
    state = reference.state_dict()
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weight = tensors.pop(name)  # [E, in, out] as transformers holds it
        blocks, scales = quantize_mxfp4(weight.transpose(1, 2).contiguous())  # [E, out, in/32, 16], [E, out, in/32]
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        # transformers' own dequantization: what the model computes with (bf16, as it loads them)
        state[name] = _convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).float()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    reference.load_state_dict(state)
    return reference.eval()


def fp8_quantized_names(hf_model, tensors, modules_to_not_convert=("lm_head",)) -> list[str]:
    """The on-disk tensors an FP8 release of ``hf_model`` stores as FP8, as DeepSeek-V3's are laid out.

    transformers' FP8 quantizer converts every plain ``nn.Linear`` and every ``.experts`` module
    outside ``modules_to_not_convert`` (its default: the output embedding, ``lm_head``): so
    attention and dense/shared MLP projections and each expert's projections; embeddings, norms,
    routers (``mlp.gate.weight``, ``e_score_correction_bias``) and ``lm_head`` stay as they are.
    ``tensors``: name -> tensor as ``hf_model.save_pretrained`` wrote them.
    """
    linear = {name for name, module in hf_model.named_modules()
              if type(module) is torch.nn.Linear and not any(name == s or name.startswith(s + ".") or name.endswith("." + s)
                                                             for s in modules_to_not_convert)}
    out = []
    for name, t in tensors.items():
        if t.dim() < 2 or not t.dtype.is_floating_point or name.endswith("bias"):
            continue
        if (name.endswith(".weight") and name[: -len(".weight")] in linear) or ".experts." in name:
            out.append(name)
    return sorted(out)


def save_fp8_checkpoint(hf_model, folder, block=(128, 128), modules_to_not_convert=None):
    """Save ``hf_model`` as DeepSeek-V3 / Kimi-K2 FP8 releases are stored; return what the checkpoint holds.

    Every tensor of :func:`fp8_quantized_names` becomes float8_e4m3fn ``X.weight`` + float32
    ``X.weight_scale_inv`` in blocks of ``block`` (``quantize_fp8_blocks``, transformers' recipe;
    partial edge blocks where ``block`` does not divide), and config.json gets the releases'
    ``quantization_config`` (``modules_to_not_convert`` too, when given). Returns a transformers
    model (fp32, eager) holding the dequantized weights, dequantized by transformers' own code:
    its load-time ``Fp8Dequantize`` where the blocks divide the shape, else the partial-block
    ``_dequantize_fp8_weight`` of its FP8 linear.
    """
    import json
    import tempfile
    from pathlib import Path

    import transformers
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    from moetrt.fp8 import quantize_fp8_blocks, scale_name

    folder = Path(folder)
    hf_model.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    dequantized = dict(tensors)
    for name in fp8_quantized_names(hf_model, tensors, tuple(modules_to_not_convert or ("lm_head",))):
        q, scale_inv = quantize_fp8_blocks(tensors[name], block)
        tensors[name], tensors[scale_name(name)] = q, scale_inv
        rows, cols = q.shape[-2:]
        if rows % block[0] == 0 and cols % block[1] == 0 or tuple(scale_inv.shape[-2:]) == (1, 1):
            dequantized[name] = Fp8Dequantize(None)._dequantize_one(q, scale_inv, output_dtype=torch.float32)
        else:  # transformers' load path derives the block from the grid and cannot read partial blocks
            dequantized[name] = _dequantize_fp8_weight(q, scale_inv, list(block), torch.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    if modules_to_not_convert is not None:
        config["quantization_config"]["modules_to_not_convert"] = list(modules_to_not_convert)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with tempfile.TemporaryDirectory() as tmp:  # the dequantized weights, loaded by transformers' own renames
        hf_model.config.save_pretrained(tmp)
        save_file(dequantized, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    return reference.eval()


def hf_greedy(hf_model, prompts, steps, pad_id: int = 0):
    """transformers' own greedy generate on left-padded prompts: the new tokens per prompt."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            eos_token_id=None, pad_token_id=pad_id,
        )
    return out[:, longest:].tolist()


def greedy_tokens_of(exported, backend: str, prompts, steps: int) -> list[list[int]]:
    """Greedy tokens of ``exported`` = (reference model, export folder) on ``backend``: the model on torch, the folder
    on ort (no stop tokens)."""
    from moetrt.runtime import Session

    model, folder = exported
    source = model if backend == "torch" else folder
    return Session(source, backend=backend).generate(prompts, max_new_tokens=steps, stop_tokens=()).tokens


def reference_and_export(hf_model, folder):
    """(moetrt's model of ``hf_model``, its canonical fp32 export in ``folder``)."""
    import moetrt
    from moetrt.export import onnx_from_torch

    model = moetrt.from_pretrained(hf_model)
    return model, onnx_from_torch(model, folder, progress=False)


def assert_save_round_trips(hf_model, folder):
    """``moetrt.save_pretrained`` of ``hf_model``'s import writes what transformers reads back to the same tensors,
    and what moetrt imports back to the same parameters."""
    import transformers

    import moetrt

    model = moetrt.from_pretrained(hf_model)
    moetrt.save_pretrained(model, folder)
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    again = moetrt.from_pretrained(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
