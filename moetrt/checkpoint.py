"""Hugging Face checkpoints in and out: config.json + safetensors (single or sharded).

Supported ``model_type``: mixtral, qwen2_moe, qwen3_moe, olmoe. Both the on-disk layout
(one tensor per expert projection: ``experts.{e}.w1`` or ``experts.{e}.gate_proj``) and the
transformers v5 in-memory layout (``experts.gate_up_proj`` ``[E, 2F, D]``) are read. Every
checkpoint tensor is either used or reported: an unknown tensor is an error, a derived buffer
(``rotary_emb.inv_freq``) a warning.

:func:`checkpoint_sources` says where each parameter's data lies without reading it (the
safetensors headers only), for the streaming export: it accepts and rejects exactly what
:func:`from_pretrained` does, through the same placement rules (``_Placer``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrt.config import PRESETS, MoEConfig
from moetrt.errors import CheckpointError, UnsupportedModelError
from moetrt.model import MoETransformer

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "from_pretrained",
    "config_from_hf",
    "hf_config_from_config",
    "save_pretrained",
    "PRESET_DIR",
    "checkpoint_sources",
    "ParamSource",
    "StoredTensor",
    "read_safetensors_header",
]

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
PRESET_DIR = Path(__file__).parent / "presets"
# presets whose trained weights ship inside the package
SHIPPED_PRESETS = ("tiny",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

_SUPPORTED_MSG = "supported model_type values: " + ", ".join(SUPPORTED_MODEL_TYPES)


# --- config ----------------------------------------------------------------------------------
def _rope_theta(hf: dict[str, Any], default: float) -> float:
    # transformers v5 writes rope_parameters, v4 checkpoints rope_scaling (+ top-level
    # rope_theta); a scaled RoPE in either one must not be silently dropped
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for rope_type in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported (only plain RoPE, rope_type 'default'); "
                "remove rope_scaling from config.json only if the model was trained without it"
            )
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def _field(hf: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in config.json (families alias some fields)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise CheckpointError(
        f"config.json of this {hf.get('model_type')} checkpoint lacks the field {' / '.join(names)}; "
        "the config is incomplete, re-download it or add the field"
    )


def config_from_hf(hf: dict[str, Any]) -> MoEConfig:
    """Translate a transformers ``config.json`` dict into a :class:`MoEConfig`."""
    try:
        return _config_from_hf(hf)
    except ValueError as exc:  # MoEConfig's validation: the file holds an impossible config
        raise CheckpointError(f"config.json of this {hf.get('model_type')} checkpoint is invalid: {exc}") from exc


def _config_from_hf(hf: dict[str, Any]) -> MoEConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; {_SUPPORTED_MSG}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (experts must be SwiGLU: 'silu')")
    heads = _field(hf, "num_attention_heads")
    # transformers' attribute_map aliases the expert count: Mixtral and Qwen3-MoE configs
    # serialise "num_local_experts", Hub checkpoints of Qwen2/3-MoE and OLMoE say "num_experts"
    num_experts = _field(hf, "num_local_experts", "num_experts") if model_type == "mixtral" else (
        _field(hf, "num_experts", "num_local_experts")
    )
    common = dict(
        vocab_size=_field(hf, "vocab_size"),
        hidden_size=_field(hf, "hidden_size"),
        num_hidden_layers=_field(hf, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        num_experts=num_experts,
        num_experts_per_tok=_field(hf, "num_experts_per_tok"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6 if model_type.startswith("qwen") else 1e-5),  # transformers defaults
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        model_type=model_type,
    )
    if model_type == "mixtral":
        return MoEConfig(
            **common, intermediate_size=_field(hf, "intermediate_size"),
            normalize_topk=True, sliding_window=hf.get("sliding_window"),
            rope_theta=_rope_theta(hf, 1e6),
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                f"{model_type} with use_sliding_window=true (per-layer windows) is not supported"
            )
        qwen2 = model_type == "qwen2_moe"
        bias = hf.get("qkv_bias", True) if qwen2 else hf.get("attention_bias", False)
        return MoEConfig(
            **common, intermediate_size=_field(hf, "moe_intermediate_size"),
            normalize_topk=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            # intermediate_size is the dense layers' F; equal to the experts' F it says nothing new
            dense_intermediate_size=(
                None if hf.get("intermediate_size") == hf["moe_intermediate_size"] else hf.get("intermediate_size")
            ),
            attention_bias=bool(bias), attention_out_bias=False if qwen2 else bool(bias),
            qk_norm=None if qwen2 else "head", rope_theta=_rope_theta(hf, 1e6),
        )
    # olmoe
    bias = bool(hf.get("attention_bias", False))
    return MoEConfig(
        **common, intermediate_size=_field(hf, "intermediate_size"),
        normalize_topk=bool(hf.get("norm_topk_prob", False)), qk_norm="full", clip_qkv=hf.get("clip_qkv"),
        attention_bias=bias, attention_out_bias=bias, rope_theta=_rope_theta(hf, 10000.0),
    )


# the q/k norm each family's attention always has
_FAMILY_QK_NORM = {"mixtral": None, "qwen2_moe": None, "qwen3_moe": "head", "olmoe": "full"}


def _inexpressible(cfg: MoEConfig) -> list[str]:
    """What of ``cfg`` its family's config.json cannot say (saving it would write another model)."""
    model_type = cfg.model_type
    problems = []
    if cfg.scoring != "softmax" or cfg.routed_scaling_factor != 1.0:
        problems.append("sigmoid scoring or routed_scaling_factor != 1")
    if model_type == "mixtral" and not cfg.normalize_topk:
        problems.append("normalize_topk=False (Mixtral always renormalises)")
    if cfg.qk_norm != _FAMILY_QK_NORM[model_type]:
        problems.append(f"qk_norm={cfg.qk_norm!r} (the family has {_FAMILY_QK_NORM[model_type]!r})")
    if cfg.clip_qkv is not None and model_type != "olmoe":
        problems.append("clip_qkv (OLMoE only)")
    if cfg.sliding_window is not None and model_type != "mixtral":
        problems.append("a sliding window (Mixtral only)")
    if model_type == "qwen2_moe":
        if not (cfg.shared_expert_intermediate_size and cfg.shared_expert_gate):
            problems.append("no gated shared expert (every Qwen2-MoE MoE layer has one)")
    elif cfg.shared_expert_intermediate_size:
        problems.append("a shared expert")
    if model_type in ("mixtral", "olmoe") and cfg.moe_layers != list(range(cfg.num_hidden_layers)):
        problems.append("dense layers among MoE layers")
    bias_ok = {
        "mixtral": not cfg.attention_bias and not cfg.attention_out_bias,
        "qwen2_moe": not cfg.attention_out_bias,  # bias on q/k/v (qkv_bias), never on o_proj
        "qwen3_moe": cfg.attention_bias == cfg.attention_out_bias,  # one flag for all four projections
        "olmoe": cfg.attention_bias == cfg.attention_out_bias,
    }[model_type]
    if not bias_ok:
        problems.append(
            f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together"
        )
    if model_type == "olmoe" and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        problems.append("head_dim != hidden_size / num_attention_heads (OLMoE's k_norm assumes it)")
    return problems


def hf_config_from_config(cfg: MoEConfig) -> dict[str, Any]:
    """The transformers ``config.json`` for ``cfg`` in its own family; errors if the family cannot say it."""
    model_type = cfg.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"cannot save model_type {model_type!r}; {_SUPPORTED_MSG}")
    problems = _inexpressible(cfg)
    if problems:
        raise UnsupportedModelError(
            f"a {model_type} config cannot express: {'; '.join(problems)}; set MoEConfig.model_type to a "
            f"family that has these options ({', '.join(SUPPORTED_MODEL_TYPES)}), or export the model to ONNX "
            "without a Hugging Face checkpoint"
        )
    hf: dict[str, Any] = dict(
        model_type=model_type, architectures=[_ARCH[model_type]], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, hidden_act="silu", num_experts_per_tok=cfg.num_experts_per_tok,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        torch_dtype="float32",
    )
    if model_type == "mixtral":
        hf.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                  sliding_window=cfg.sliding_window)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        hf.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.intermediate_size,
                  intermediate_size=cfg.dense_ffn_size, norm_topk_prob=cfg.normalize_topk,
                  decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                  use_sliding_window=False)
        if model_type == "qwen2_moe":
            hf.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, qkv_bias=cfg.attention_bias)
        else:
            hf.update(attention_bias=cfg.attention_bias)
    else:
        hf.update(num_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                  norm_topk_prob=cfg.normalize_topk, clip_qkv=cfg.clip_qkv, attention_bias=cfg.attention_bias)
    return hf


_ARCH = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

# --- tensor names ------------------------------------------------------------------------------
# one projection of one expert, as stored on disk
_PER_EXPERT = re.compile(
    r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_DERIVED = re.compile(r"rotary_emb\.inv_freq$|\.rotary_emb\.original_inv_freq$")


def _canonical_name(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model.") :]
    return name.replace(".block_sparse_moe.", ".mlp.")


# --- reading -----------------------------------------------------------------------------------
def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-download the checkpoint") from exc
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{folder} is missing shard(s) named in model.safetensors.index.json: {', '.join(missing)}; "
                "re-download the checkpoint"
            )
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} holds PyTorch pickle weights (*.bin/*.pt) but no *.safetensors; moetrt reads only "
            "safetensors: convert with transformers (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(
        f"{folder} has no model.safetensors (or sharded *.safetensors + index); copy the weight files into it, "
        "or write them with moetrt.save_pretrained"
    )


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time from every shard of a checkpoint folder."""
    from safetensors import safe_open

    for path in _shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(
                f"cannot read {path}: {exc}; the file is corrupt or truncated, re-download it"
            ) from exc


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; point at a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def _empty_model(cfg: MoEConfig, dtype: torch.dtype) -> MoETransformer:
    """A model with allocated but uninitialised weights (the loader fills every one)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.rotary = type(model.rotary)(cfg.head_dim, cfg.rope_theta)  # buffers are derived, not loaded
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


class _Placer:
    """Where each checkpoint tensor goes in a model of ``cfg``; what is left unfilled or unused at the end.

    ``shapes``: parameter name -> shape, tied parameters under both names. Shared by the loader
    (which copies each tensor as it comes) and :func:`checkpoint_sources` (which only notes where
    each tensor lies), so both accept and reject exactly the same checkpoints.
    """

    def __init__(self, cfg: MoEConfig, shapes: dict[str, tuple[int, ...]], source: str):
        self.cfg, self.shapes, self.source = cfg, shapes, source
        self.filled: set[str] = set()
        self.filled_parts: set[tuple[str, int, str]] = set()
        self.unused: list[str] = []
        self.derived: list[str] = []

    def _check(self, dst_name: str, dst_shape: tuple[int, ...], src_name: str, shape: tuple[int, ...], dtype) -> None:
        if tuple(dst_shape) != tuple(shape):
            raise CheckpointError(
                f"{self.source}: tensor {src_name!r} has shape {tuple(shape)}, the config implies "
                f"{tuple(dst_shape)} for {dst_name}; config.json and the weights disagree: use the config.json that came with these weights"
            )
        if not dtype.is_floating_point:
            raise CheckpointError(f"{self.source}: tensor {src_name!r} has dtype {dtype}; expected floating point")

    def place(self, raw_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[str, int | None, str | None] | None:
        """(parameter, expert, part) that checkpoint tensor ``raw_name`` fills, or None if it fills none.

        ``expert``/``part`` are None for a whole parameter; ``part`` is gate | up | down of one
        expert of a stacked ``[E, 2F, D]`` / ``[E, D, F]`` tensor.
        """
        name = _canonical_name(raw_name)
        match = _PER_EXPERT.match(name)
        if match:
            layer, expert, part = int(match[1]), int(match[2]), _PART[match[3]]
            base = f"layers.{layer}.mlp.experts"
            key = f"{base}.down_proj" if part == "down" else f"{base}.gate_up_proj"
            if key not in self.shapes or expert >= self.cfg.num_experts:
                self.unused.append(raw_name)
                return None
            dst_shape = list(self.shapes[key][1:])  # [D, F] or [2F, D]
            if part != "down":
                dst_shape[0] = self.cfg.intermediate_size  # the gate or the up rows
            self._check(f"{key}[{expert}] ({part})", tuple(dst_shape), raw_name, shape, dtype)
            self.filled_parts.add((key, expert, part))
            return key, expert, part
        if name in self.shapes:
            self._check(name, self.shapes[name], raw_name, shape, dtype)
            self.filled.add(name)
            return name, None, None
        if _DERIVED.search(name):
            self.derived.append(raw_name)
        else:
            self.unused.append(raw_name)
        return None

    def finish(self) -> None:
        """Raise if a tensor had no place or a parameter was not filled; warn about ignored buffers."""
        cfg, filled, filled_parts = self.cfg, set(self.filled), self.filled_parts
        for key in [k for k in self.shapes if k.endswith(".experts.gate_up_proj") or k.endswith(".experts.down_proj")]:
            parts = ("down",) if key.endswith("down_proj") else ("gate", "up")
            if key not in filled and all((key, e, p) in filled_parts for e in range(cfg.num_experts) for p in parts):
                filled.add(key)
        if cfg.tie_word_embeddings and "embed_tokens.weight" in filled:
            filled.add("lm_head.weight")
        missing = sorted(set(self.shapes) - filled)
        for i, key in enumerate(missing):  # a stacked expert tensor filled in part: say which parts lack
            if key.endswith(".experts.gate_up_proj") or key.endswith(".experts.down_proj"):
                parts = ("down",) if key.endswith("down_proj") else ("gate", "up")
                lacking = [f"expert {e} {p}" for e in range(cfg.num_experts) for p in parts
                           if (key, e, p) not in filled_parts]
                if len(lacking) < cfg.num_experts * len(parts):
                    missing[i] = f"{key} ({', '.join(lacking[:4])}{', ...' if len(lacking) > 4 else ''})"
        if self.unused:
            raise CheckpointError(
                f"{self.source}: {len(self.unused)} checkpoint tensor(s) have no place in a {cfg.model_type} model "
                f"with this config (first: {', '.join(self.unused[:5])}); config.json and the weights disagree: use the config.json that came with these weights"
            )
        if missing:
            raise CheckpointError(
                f"{self.source}: {len(missing)} tensor(s) the config needs are missing from the checkpoint "
                f"(first: {', '.join(missing[:5])}); the checkpoint is incomplete or of another architecture"
            )
        if self.derived:
            warnings.warn(
                f"{self.source}: ignored {len(self.derived)} derived buffer(s) recomputed from the config (rotary inv_freq)"
            )


def load_state(model: MoETransformer, tensors: Iterator[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy checkpoint tensors into ``model``; every parameter must be filled, every tensor used."""
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    placer = _Placer(cfg, {name: tuple(p.shape) for name, p in params.items()}, source)
    ffn = cfg.intermediate_size
    for raw_name, tensor in tensors:
        where = placer.place(raw_name, tuple(tensor.shape), tensor.dtype)
        if where is None:
            continue
        key, expert, part = where
        dst = params[key] if expert is None else params[key][expert]  # [D, F] or [2F, D] for one expert
        if part == "gate":
            dst = dst[:ffn]
        elif part == "up":
            dst = dst[ffn:]
        with torch.no_grad():
            dst.copy_(tensor)
    placer.finish()
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if nonfinite:
        warnings.warn(f"{source}: non-finite values (NaN/Inf) in {', '.join(nonfinite[:5])}; outputs will be NaN")


# --- streaming: where each parameter lies on disk, read one tensor at a time --------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read on demand with a single file read.

    Plain reads rather than a memory map: mapped pages of a multi-GB shard count towards the
    process's resident memory for as long as the file stays mapped.
    """

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int

    def read(self) -> torch.Tensor:
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buffer = bytearray(self.nbytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(buffer)
        if got != self.nbytes:
            raise CheckpointError(
                f"cannot read {self.path}: tensor {self.name!r} is cut short ({got} of {self.nbytes} bytes); "
                "the file is truncated, re-download it"
            )
        return torch.frombuffer(buffer, dtype=torch.uint8).view(self.dtype).reshape(self.shape)


def read_safetensors_header(path: str | os.PathLike) -> list[StoredTensor]:
    """The tensors of one safetensors file (names, dtypes, shapes, byte ranges), without reading their data."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            header_len = int.from_bytes(head, "little")
            if header_len > min(size - 8, 100 << 20):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        start = 8 + header_len
        tensors = []
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which moetrt does not read")
            if not 0 <= begin <= end or start + end > size:
                raise ValueError(f"tensor {name!r} lies outside the file (offsets {begin}..{end})")
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            nbytes = end - begin
            expected = torch.Size(shape).numel() * dtype.itemsize
            if nbytes != expected:
                raise ValueError(f"tensor {name!r} holds {nbytes} bytes, its shape {shape} needs {expected}")
            tensors.append(StoredTensor(path, name, dtype, shape, start + begin, nbytes))
        return tensors
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the file is corrupt or truncated, re-download it") from exc


def _to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """As loading into a float32 model and then ``.to(dtype)`` rounds: through float32."""
    if tensor.dtype == dtype:
        return tensor
    return tensor.to(torch.float32).to(dtype)


@dataclass(frozen=True)
class ParamSource:
    """Where one model parameter lies in a checkpoint: one stored tensor, or per-expert pieces.

    ``pieces`` are in memory order: their data, one after the other, is the parameter's data
    (``[E, 2F, D]``: expert 0 gate rows, expert 0 up rows, expert 1 gate rows, ...).
    """

    name: str  # model parameter name, e.g. layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]
    pieces: tuple[StoredTensor, ...]

    def chunks(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The pieces in memory order, each read and converted to ``dtype`` on its own."""
        for piece in self.pieces:
            yield _to_dtype(piece.read(), dtype)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole parameter in ``dtype`` (one tensor of its size in memory)."""
        if len(self.pieces) == 1:
            return next(self.chunks(dtype)).reshape(self.shape)
        out = torch.empty(self.shape, dtype=dtype)
        flat, offset = out.view(-1), 0
        for chunk in self.chunks(dtype):
            flat[offset : offset + chunk.numel()] = chunk.reshape(-1)
            offset += chunk.numel()
            del chunk  # before the next one is read
        assert offset == out.numel(), (self.name, offset, out.numel())
        return out


def checkpoint_sources(folder: str | os.PathLike) -> tuple[MoEConfig, dict[str, ParamSource]]:
    """The config of a checkpoint folder and, per model parameter, where its data lies.

    Reads only config.json and the safetensors headers; accepts and rejects exactly the
    checkpoints :func:`from_pretrained` does. Tied ``lm_head.weight`` is not listed (it is
    ``embed_tokens.weight``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; point at a Hugging Face checkpoint folder")
    cfg = config_from_hf(_read_config_json(folder))
    with torch.device("meta"):
        model = MoETransformer(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    placer = _Placer(cfg, shapes, str(folder))
    whole: dict[str, StoredTensor] = {}
    parts: dict[tuple[str, int, str], StoredTensor] = {}
    for path in _shard_files(folder):
        for stored in read_safetensors_header(path):
            where = placer.place(stored.name, stored.shape, stored.dtype)
            if where is None:
                continue
            key, expert, part = where
            if expert is None:
                if cfg.tie_word_embeddings and key == "lm_head.weight":
                    key = "embed_tokens.weight"  # one tensor under two names: the last one read wins
                whole[key] = stored
            else:
                parts[(key, expert, part)] = stored
    placer.finish()
    sources = {}
    for name, p in model.named_parameters():
        order = (("down",) if name.endswith(".experts.down_proj") else ("gate", "up"))
        stacked = [parts.get((name, e, part)) for e in range(cfg.num_experts) for part in order]
        if all(stacked) and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            pieces = tuple(stacked)
        else:
            pieces = (whole[name],)
        sources[name] = ParamSource(name, tuple(p.shape), pieces)
    return cfg, sources


def _from_transformers(hf_model: Any, dtype: torch.dtype | None) -> MoETransformer:
    hf_cfg = hf_model.config.to_dict()
    cfg = config_from_hf(hf_cfg)
    model = _empty_model(cfg, dtype or torch.float32)
    state = hf_model.state_dict()
    load_state(model, iter(state.items()), f"transformers model {type(hf_model).__name__}")
    return model.eval()


def from_pretrained(
    source: str | os.PathLike | Any, dtype: torch.dtype | None = None, seed: int = 0
) -> MoETransformer:
    """Load a model in eval mode from a checkpoint folder, a preset name, or a transformers model.

    - a folder: Hugging Face ``config.json`` + ``*.safetensors`` (sharded index too) of a
      supported family (mixtral, qwen2_moe, qwen3_moe, olmoe);
    - ``"tiny"``: the small trained model shipped with moetrt; any other preset name
      (``MoEConfig.from_name``) gives a randomly initialised model (seeded by ``seed``);
    - an in-memory ``transformers`` model of a supported family.

    ``dtype`` defaults to float32, the reference precision.
    """
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "config") and hasattr(source, "state_dict"):
            return _from_transformers(source, dtype)
        raise TypeError(
            f"from_pretrained takes a checkpoint folder, a preset name or a transformers model, got {type(source).__name__}"
        )
    folder = Path(source)
    if not folder.exists():
        name = str(source)
        if name in SHIPPED_PRESETS:
            folder = PRESET_DIR / name
        elif name in PRESETS:
            warnings.warn(f"preset {name!r} ships no trained weights: initialised randomly with seed {seed}")
            model = MoETransformer.from_config(MoEConfig.from_name(name), seed=seed).to(dtype or torch.float32)
            model.source = name if seed == 0 else None  # what from_pretrained(source) rebuilds exactly
            return model
        else:
            raise CheckpointError(
                f"{name!r} is neither an existing folder nor a preset; presets: {', '.join(sorted(PRESETS))}"
            )
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; point at a Hugging Face checkpoint folder")
    cfg = config_from_hf(_read_config_json(folder))
    model = _empty_model(cfg, dtype or torch.float32)
    load_state(model, iter_safetensors(folder), str(folder))
    model.source_dir = folder  # where tokenizer files may be found
    model.source = str(source) if str(source) in SHIPPED_PRESETS else str(folder.resolve())
    return model.eval()


# --- writing -----------------------------------------------------------------------------------
def _hf_tensors(model: MoETransformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the on-disk names of its family (one tensor per expert projection)."""
    cfg = model.config
    mixtral = cfg.model_type == "mixtral"
    names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else {p: f"{p}_proj" for p in ("gate", "up", "down")}
    ffn = cfg.intermediate_size
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        prefix = "" if name == "lm_head.weight" else "model."
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            base = name.rsplit(".", 1)[0]
            if mixtral:
                base = base.replace(".mlp.", ".block_sparse_moe.")
            for e in range(cfg.num_experts):
                if name.endswith("down_proj"):
                    yield f"model.{base}.{e}.{names['down']}.weight", tensor[e]
                else:
                    yield f"model.{base}.{e}.{names['gate']}.weight", tensor[e, :ffn]
                    yield f"model.{base}.{e}.{names['up']}.weight", tensor[e, ffn:]
            continue
        if mixtral:
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        yield prefix + name, tensor


def save_pretrained(model: MoETransformer, folder: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (config.json + model.safetensors).

    ``extra_files`` maps file names to text (a tokenizer.json, say). The folder must not exist.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    hf = hf_config_from_config(model.config)
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; choose a new folder (moetrt never overwrites a checkpoint)")
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        raise CheckpointError(f"{tmp} exists (left by an interrupted save?); remove it and retry")
    tmp.mkdir(parents=True)
    try:
        tensors = {name: t.detach().contiguous().clone() for name, t in _hf_tensors(model)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors writes it private
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        tmp.rename(folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
