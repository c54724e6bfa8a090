"""``genai_config.json``: what onnxruntime-genai needs to run an exported (or optimized) folder.

    import onnxruntime_genai as og
    model = og.Model("exported/tiny")
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model); params.set_search_options(max_length=64)

The export and ``optimize --target ort-cpu|ort-cuda`` write it beside ``model.onnx`` from what
they already know: the inputs and outputs from the I/O spec and the state contract, the token ids
from the checkpoint's config, the search defaults from the source's ``generation_config.json``.
Facts of onnxruntime-genai (0.18) this follows:

- ``model.type`` must be a type it knows: it refuses ``mixtral`` and the other moetrt families'
  names, while a decoder-only type such as ``qwen2`` runs any graph with these inputs and
  outputs (its type only chooses how inputs are fed, not what the graph computes);
- ``past_present_share_buffer`` must be false: a moetrt ``present`` grows by ``Concat``, it is
  not written into a fixed-capacity buffer;
- ``context_length`` bounds ``max_length``;
- its tokenizer needs ``tokenizer.json`` and ``tokenizer_config.json`` (a folder without them runs
  with token ids only).

A layer state other than key/value (latent attention's ``latent`` / ``rope_key``) has no name
slots in genai's configuration: no file is written, and ``moetrt.json`` says why (``genai``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["GENAI_CONFIG_FILE", "GENAI_MODEL_TYPE", "genai_config", "write_genai_config"]

GENAI_CONFIG_FILE = "genai_config.json"
# a decoder-only type onnxruntime-genai knows, with input_ids / attention_mask / position_ids and
# past_key_values.%d.key|value -> present.%d.key|value; genai refuses "mixtral", "qwen2_moe", ...
GENAI_MODEL_TYPE = "qwen2"
# generation_config.json fields -> genai search options of the same meaning
_SEARCH_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
                  "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "min_length", "early_stopping")


def genai_config(meta: dict[str, Any], generation_config: dict[str, Any] | None = None) -> tuple[dict | None, str]:
    """(the ``genai_config.json`` content for the artifact ``meta`` describes, or None; why not, if None).

    ``meta`` is the artifact's ``moetrt.json`` content (``config`` and ``io``);
    ``generation_config`` the source's ``generation_config.json`` ({} or None: genai's defaults,
    greedy).
    """
    from moetrt.config import MoEConfig
    from moetrt.state import KEY, VALUE, PAST_PREFIX, PRESENT_PREFIX, StateContract

    cfg = MoEConfig.from_dict(meta["config"])
    state = StateContract.read(meta, cfg)
    kinds = {tuple(e.name for e in layer) for layer in state.layers}
    if kinds != {(KEY.name, VALUE.name)}:
        names = sorted({e.name for layer in state.layers for e in layer})
        return None, (f"onnxruntime-genai caches key/value per layer only; this model's layers carry {', '.join(names)}, "
                      "which its configuration cannot name")
    if {layer for layer in state.layers} != {(KEY, VALUE)}:  # e.g. Gemma 4's full layers: their own heads and head dim
        shapes = sorted({str(e.dims) for layer in state.layers for e in layer})
        return None, (f"onnxruntime-genai sizes every layer's key/value alike; this model's layers differ ({'; '.join(shapes)}), "
                      "which its configuration cannot state")
    io = meta.get("io") or {}
    inputs = {t["name"] for t in io.get("inputs", [])}
    outputs = {t["name"] for t in io.get("outputs", [])}
    missing = {"input_ids", "attention_mask", "logits"} - inputs - outputs
    if missing:
        return None, f"the graph lacks {', '.join(sorted(missing))}"
    gen = dict(generation_config or {})
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    bos = gen.get("bos_token_id", cfg.bos_token_id)
    pad = gen.get("pad_token_id", cfg.pad_token_id)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    context = int(cfg.max_position_embeddings)
    decoder_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                      "past_key_names": f"{PAST_PREFIX}%d.{KEY.name}", "past_value_names": f"{PAST_PREFIX}%d.{VALUE.name}"}
    if "position_ids" in inputs:
        decoder_inputs["position_ids"] = "position_ids"
    search: dict[str, Any] = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
        "max_length": context, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
        "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
        "past_present_share_buffer": False,  # present = Concat(past, new): no fixed-capacity buffer to share
    }
    search.update({k: gen[k] for k in _SEARCH_FIELDS if gen.get(k) is not None})
    if gen.get("max_length") is not None:
        search["max_length"] = min(int(gen["max_length"]), context)
    config = {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "vocab_size": cfg.vocab_size,
            "context_length": context,
            "bos_token_id": bos if bos is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": cfg.hidden_size,
                "head_size": cfg.head_dim,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": f"{PRESENT_PREFIX}%d.{KEY.name}",
                            "present_value_names": f"{PRESENT_PREFIX}%d.{VALUE.name}"},
            },
        },
        "search": search,
    }
    return config, ""


def write_genai_config(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``genai_config.json`` into ``folder`` (the artifact being written) when genai can run it.

    Reads the ``generation_config.json`` already copied there. Returns what ``moetrt.json``
    records under ``genai``: ``{"file": name}`` or ``{"file": None, "reason": why}``.
    """
    path = Path(folder) / "generation_config.json"
    try:
        generation = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        generation = {}  # the runtime reports a corrupt file when it reads it; genai gets the defaults
    config, reason = genai_config(meta, generation)
    if config is None:
        return {"file": None, "reason": reason}
    (Path(folder) / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return {"file": GENAI_CONFIG_FILE}
