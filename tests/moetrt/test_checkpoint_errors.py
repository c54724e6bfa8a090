"""Bad checkpoints and configs fail with a ``MoetrtError`` (or ``ValueError`` for a config) naming the problem."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import moetrt
from moetrt import CheckpointError, MoEConfig, MoetrtError, UnsupportedModelError
from moetrt.checkpoint import config_from_hf

pytest.importorskip("transformers")


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A fresh, writable copy of a saved tiny Mixtral checkpoint."""
    _, folder = tiny_checkpoint("mixtral")
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    return copy


@pytest.fixture
def sharded(tiny_checkpoint, tmp_path):
    hf, _ = tiny_checkpoint("mixtral")
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def _edit_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _raises(exc_type, *needles, call):
    with pytest.raises(exc_type) as info:
        call()
    assert isinstance(info.value, MoetrtError)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


def test_the_good_checkpoint_loads(checkpoint):
    model = moetrt.from_pretrained(checkpoint)
    assert model.config.model_type == "mixtral"


# --- config.json -----------------------------------------------------------------------------------
def test_unsupported_model_type_lists_the_supported_ones(checkpoint):
    _edit_config(checkpoint, model_type="llama")
    _raises(UnsupportedModelError, "'llama'", *moetrt.SUPPORTED_MODEL_TYPES, call=lambda: moetrt.from_pretrained(checkpoint))


def test_unsupported_transformers_model_in_memory():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    llama = transformers.LlamaForCausalLM(cfg)
    _raises(UnsupportedModelError, "'llama'", "mixtral", call=lambda: moetrt.from_pretrained(llama))


def test_missing_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    _raises(CheckpointError, "config.json", call=lambda: moetrt.from_pretrained(checkpoint))


def test_config_json_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{model_type: mixtral")
    _raises(CheckpointError, "config.json", "not valid JSON", call=lambda: moetrt.from_pretrained(checkpoint))


def test_config_json_missing_a_required_field(checkpoint):
    _edit_config(checkpoint, num_local_experts=None)
    _raises(CheckpointError, "num_local_experts", call=lambda: moetrt.from_pretrained(checkpoint))


def test_config_json_with_invalid_values_is_a_checkpoint_error(checkpoint):
    """MoEConfig's ValueError surfaces as a CheckpointError that still names the field."""
    _edit_config(checkpoint, num_experts_per_tok=9)
    _raises(CheckpointError, "config.json", "num_experts_per_tok", call=lambda: moetrt.from_pretrained(checkpoint))


@pytest.mark.parametrize(
    "changes,needle",
    [
        # transformers v4 style: top-level rope_theta + rope_scaling
        (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "longrope", "factor": 4.0}), "'longrope'"),
        (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"rope_type": "su", "factor": 2.0}), "'su'"),
        # v5 style; and a parameter the type does not read is refused, never dropped
        (dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4, "factor": 2.0}), "'mrope'"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 3}), "beta_fast"),
    ],
)
def test_unsupported_rope_scaling(checkpoint, changes, needle):
    _edit_config(checkpoint, **changes)
    _raises(UnsupportedModelError, needle, "RoPE", call=lambda: moetrt.from_pretrained(checkpoint))


@pytest.mark.parametrize(
    "changes,rope_type",
    [
        (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "dynamic"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}), "llama3"),
    ],
)
def test_scaled_rope_is_read(checkpoint, changes, rope_type):
    """Scaled RoPE types moetrt implements land in MoEConfig.rope_scaling (their parity: test_hf_parity)."""
    _edit_config(checkpoint, **changes)
    cfg = moetrt.from_pretrained(checkpoint).config
    assert cfg.rope_scaling["rope_type"] == rope_type and cfg.rope_theta == 1e4


def test_transformers_v4_style_config_loads(checkpoint):
    """Hub checkpoints written by transformers 4.x: top-level rope_theta, rope_scaling null."""
    _edit_config(checkpoint, rope_parameters=None, rope_theta=5000.0, rope_scaling={})
    assert moetrt.from_pretrained(checkpoint).config.rope_theta == 5000.0


def test_unsupported_activation(checkpoint):
    _edit_config(checkpoint, hidden_act="gelu")
    _raises(UnsupportedModelError, "'gelu'", "hidden_act", call=lambda: moetrt.from_pretrained(checkpoint))


# --- tensors ---------------------------------------------------------------------------------------
def test_missing_tensor_is_named(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _raises(CheckpointError, "missing", "layers.1.self_attn.k_proj.weight", call=lambda: moetrt.from_pretrained(checkpoint))


def test_missing_expert_tensor_is_named(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w3.weight"))
    _raises(CheckpointError, "missing", "layers.0", "expert 3", "up", call=lambda: moetrt.from_pretrained(checkpoint))


def test_extra_tensor_is_named(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update({"model.layers.0.self_attn.extra_proj.weight": torch.zeros(2, 2)}))
    _raises(CheckpointError, "model.layers.0.self_attn.extra_proj.weight", call=lambda: moetrt.from_pretrained(checkpoint))


def test_expert_beyond_num_experts_is_unused(checkpoint):
    def add(t):
        t["model.layers.0.block_sparse_moe.experts.6.w1.weight"] = t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].clone()

    _edit_tensors(checkpoint, add)
    _raises(CheckpointError, "experts.6.w1", call=lambda: moetrt.from_pretrained(checkpoint))


def test_config_and_weights_disagree_on_shape(checkpoint):
    _edit_config(checkpoint, intermediate_size=40)  # the weights were saved with 48
    _raises(CheckpointError, "shape", "disagree", call=lambda: moetrt.from_pretrained(checkpoint))


def test_integer_tensor_is_rejected(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    _raises(CheckpointError, "model.norm.weight", "dtype", call=lambda: moetrt.from_pretrained(checkpoint))


def test_derived_rotary_buffer_is_ignored_with_a_warning(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(8)}))
    with pytest.warns(UserWarning, match="inv_freq"):
        moetrt.from_pretrained(checkpoint)


def test_nan_weights_warn_naming_the_tensor(checkpoint):
    def poison(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")

    _edit_tensors(checkpoint, poison)
    with pytest.warns(UserWarning, match=r"layers\.1\.self_attn\.v_proj\.weight"):
        moetrt.from_pretrained(checkpoint)


# --- files -----------------------------------------------------------------------------------------
def test_corrupt_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))
    _raises(CheckpointError, "model.safetensors", "corrupt", call=lambda: moetrt.from_pretrained(checkpoint))


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(CheckpointError, "model.safetensors", "truncated", call=lambda: moetrt.from_pretrained(checkpoint))


def test_shard_listed_in_index_but_missing(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).unlink()
    _raises(CheckpointError, victim, "model.safetensors.index.json", call=lambda: moetrt.from_pretrained(sharded))


def test_index_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("not json")
    _raises(CheckpointError, "model.safetensors.index.json", call=lambda: moetrt.from_pretrained(sharded))


def test_only_pytorch_bin(checkpoint):
    from safetensors.torch import load_file

    torch.save(load_file(str(checkpoint / "model.safetensors")), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    _raises(CheckpointError, "*.bin", "safetensors", "save_pretrained", call=lambda: moetrt.from_pretrained(checkpoint))


def test_no_weights_at_all(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    _raises(CheckpointError, "no model.safetensors", call=lambda: moetrt.from_pretrained(checkpoint))


def test_nonexistent_path_that_is_not_a_preset(tmp_path):
    missing = tmp_path / "no-such-model"
    from moetrt.checkpoint import _available_memory, preset_parameters

    # the hint lists the presets this machine can hold (mixtral-8x7b's 187 GB in fp32: only on a large one)
    message = _raises(CheckpointError, str(missing), "preset", "tiny", call=lambda: moetrt.from_pretrained(missing))
    available = _available_memory()
    if available is not None and 4 * preset_parameters("mixtral-8x7b") >= available / 2:
        assert "mixtral-8x7b" not in message
    _raises(CheckpointError, "'mixtral-8x8b'", "neither", call=lambda: moetrt.from_pretrained("mixtral-8x8b"))


def test_path_to_a_file(checkpoint):
    _raises(CheckpointError, "not a folder", call=lambda: moetrt.from_pretrained(checkpoint / "config.json"))


def test_not_a_model_object():
    with pytest.raises(TypeError, match="checkpoint folder, a preset name or a transformers model"):
        moetrt.from_pretrained(42)


# --- MoEConfig validation ----------------------------------------------------------------------------
SMALL = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts=4, num_experts_per_tok=2, intermediate_size=16)


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=30), "head_dim"),
        (dict(head_dim=7), "head_dim"),
        (dict(scoring="relu"), "scoring"),
        (dict(activation="gelu"), "activation"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_hidden_layers=2.0), "num_hidden_layers"),
        (dict(intermediate_size=True), "intermediate_size"),
        (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
        (dict(mlp_only_layers=(2,)), "mlp_only_layers"),
        (dict(mlp_only_layers=(0, 1)), "MoE layer"),
        (dict(decoder_sparse_step=3), "MoE layer"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(clip_qkv=0.0), "clip_qkv"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(dense_intermediate_size=0), "dense_intermediate_size"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**SMALL, **changes})


def test_config_validation_allows_the_presets():
    for name, preset in moetrt.PRESETS.items():
        assert MoEConfig.from_dict(preset.to_dict()) == preset, name


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="mixtral-8x7b"):
        MoEConfig.from_name("mixtral-9x7b")
    with pytest.raises(ValueError, match="num_expert"):
        MoEConfig.from_dict({**SMALL, "num_expert": 3})


def test_config_from_hf_accepts_either_expert_count_name():
    base = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32)
    assert config_from_hf({**base, "num_experts": 6}).num_experts == 6
    assert config_from_hf({**base, "num_local_experts": 6}).num_experts == 6


def test_warnings_do_not_fire_on_a_clean_checkpoint(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moetrt.from_pretrained(checkpoint)
