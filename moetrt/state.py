"""The per-layer state contract: what each decoder layer carries from one step to the next.

Every stage reads the names, shapes and dtypes of that state from here (DESIGN.md, "Model
families, op specs, state")::

    entry      dims                                     dtype   grows along
    key        (batch, kv_heads, past, head_dim)        model   past (axis 2)
    value      (batch, kv_heads, past, head_dim)        model   past (axis 2)

and with multi-head latent attention (``MoEConfig.kv_lora_rank`` set: DeepSeek-V3, Kimi-K2,
GLM-4.7-Flash), instead of key and value::

    latent     (batch, past, kv_lora_rank)              model   past (axis 1)
    rope_key   (batch, past, qk_rope_head_dim)          model   past (axis 1)

and in a Gated DeltaNet layer (``layer_types`` entry ``linear_attention``: Qwen3-Next, Qwen3.5-MoE),
fixed-size state instead of key and value::

    conv_state       (batch, linear_conv_dim, linear_conv_state)             model
    recurrent_state  (batch, linear_value_heads, linear_key_dim, linear_value_dim)  fp32

``conv_state`` holds the last ``linear_conv_kernel_dim - 1`` inputs of the causal conv over q/k/v,
``recurrent_state`` the delta rule's state (float32 in every export, as transformers keeps it).

``latent`` is the normalised compressed key/value (``kv_a_layernorm`` of ``kv_a_proj_with_mqa``'s
first ``kv_lora_rank`` outputs), ``rope_key`` the rotary key shared by every head, after RoPE: the
step expands keys and values from them (``kv_b_proj``). For DeepSeek-V3 that is 512 + 64 values
per token and layer against 2 x 128 heads x (192 | 128) for full keys and values.

Full-attention layers whose head dim or key/value heads differ from the sliding ones (Gemma 4's
``full_attention_head_dim`` / ``full_attention_kv_heads``) carry key and value of
``(batch, full_kv_heads, past, full_head_dim)``, under the same names.

A layer's state is a tuple of :class:`StateEntry`. An entry names its dims symbolically:
``batch`` (the batch axis), ``past`` (the positions seen so far: the step's output holds
``past + sequence`` of them, concatenated along that axis), and sizes read from the model
config (:data:`SIZES`). An entry without ``past`` is fixed-size state (a linear-attention
recurrent state ``[B, H, Dk, Dv]``): its present replaces its past. The dtype rule is
``"model"`` (the artifact's dtype) or ``"fp32"`` (kept float32 in every export).

Graph names follow onnxruntime-genai / optimum: ``past_key_values.{i}.{entry}`` in,
``present.{i}.{entry}`` out. :class:`StateContract` holds every layer's entries with the
sizes resolved; ``to_dict`` is ``io["state"]`` in ``moetrt.json``, and :meth:`StateContract.read`
falls back to key/value for folders written before the contract was recorded.

A new kind of state (MLA's latent, a conv state) is one more :class:`StateEntry` returned by
:func:`state_entries` for the layers that carry it. Pure Python: importing it costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = [
    "BATCH", "PAST", "SIZES", "DTYPE_RULES", "StateEntry", "StateContract", "KEY", "VALUE",
    "LATENT", "ROPE_KEY", "CONV_STATE", "RECURRENT_STATE", "state_entries", "state_contract", "past_name", "present_name", "PAST_PREFIX", "PRESENT_PREFIX",
]

BATCH, PAST = "batch", "past"
# symbolic dim -> the MoEConfig field that sizes it
SIZES = {"kv_heads": "num_key_value_heads", "head_dim": "head_dim", "kv_lora_rank": "kv_lora_rank",
         "qk_rope_head_dim": "qk_rope_head_dim", "linear_conv_dim": "linear_conv_dim",
         "linear_conv_state": "linear_conv_state_size", "linear_value_heads": "linear_num_value_heads",
         "linear_key_dim": "linear_key_head_dim", "linear_value_dim": "linear_value_head_dim",
         "full_kv_heads": "full_kv_heads", "full_head_dim": "full_head_dim"}
# "model": the artifact's dtype (fp32 | fp16 | bf16); "fp32": float32 whatever the artifact's dtype
DTYPE_RULES = ("model", "fp32")
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


@dataclass(frozen=True)
class StateEntry:
    """One tensor a layer carries between steps."""

    name: str  # "key", "value": the last part of past_key_values.{i}.{name} / present.{i}.{name}
    dims: tuple[str | int, ...]  # symbolic: BATCH first, PAST where it grows (absent: fixed-size state)
    dtype: str = "model"  # one of DTYPE_RULES

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"StateEntry.name must be a non-empty identifier (key, value, ...), got {self.name!r}")
        object.__setattr__(self, "dims", tuple(self.dims))
        if not self.dims or self.dims[0] != BATCH:
            raise ValueError(f"StateEntry {self.name!r}: dims must start with {BATCH!r}, got {self.dims}")
        if self.dims.count(PAST) > 1:
            raise ValueError(f"StateEntry {self.name!r}: dims may hold {PAST!r} once, got {self.dims}")
        for d in self.dims[1:]:
            if d != PAST and not isinstance(d, int) and d not in SIZES:
                raise ValueError(
                    f"StateEntry {self.name!r}: dim {d!r} must be an int, {PAST!r} or one of {', '.join(SIZES)}"
                )
        if self.dtype not in DTYPE_RULES:
            raise ValueError(f"StateEntry {self.name!r}: dtype must be one of {', '.join(DTYPE_RULES)}, got {self.dtype!r}")

    @property
    def concat_axis(self) -> int | None:
        """The axis a step appends its positions along; ``None`` for fixed-size state."""
        return self.dims.index(PAST) if PAST in self.dims else None

    @property
    def grows(self) -> bool:
        return PAST in self.dims

    def shape(self, sizes: Mapping[str, int], batch: int, past: int) -> tuple[int, ...]:
        """The concrete shape at ``batch`` and ``past`` positions (``past`` is ignored by fixed-size state)."""
        return self.symbolic_shape(sizes, batch, past)

    def symbolic_shape(self, sizes: Mapping[str, int], batch: Any, past: Any) -> tuple[Any, ...]:
        """The shape with the given names (or sizes) for the batch and past axes, the rest resolved."""
        return tuple(batch if d == BATCH else past if d == PAST else d if isinstance(d, int) else sizes[d]
                     for d in self.dims)

    def element_dtype(self, model_dtype: str) -> str:
        """The dtype (fp32 | fp16 | bf16) of this entry in an artifact of ``model_dtype``."""
        return model_dtype if self.dtype == "model" else self.dtype

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StateEntry:
        return cls(name=data["name"], dims=tuple(data["dims"]), dtype=data.get("dtype", "model"))


KEY = StateEntry("key", (BATCH, "kv_heads", PAST, "head_dim"))
VALUE = StateEntry("value", (BATCH, "kv_heads", PAST, "head_dim"))
LATENT = StateEntry("latent", (BATCH, PAST, "kv_lora_rank"))
ROPE_KEY = StateEntry("rope_key", (BATCH, PAST, "qk_rope_head_dim"))
CONV_STATE = StateEntry("conv_state", (BATCH, "linear_conv_dim", "linear_conv_state"))
RECURRENT_STATE = StateEntry("recurrent_state", (BATCH, "linear_value_heads", "linear_key_dim", "linear_value_dim"),
                             dtype="fp32")


# full-attention layers whose head dim or key/value heads differ from the sliding ones (Gemma 4)
FULL_KEY = StateEntry("key", (BATCH, "full_kv_heads", PAST, "full_head_dim"))
FULL_VALUE = StateEntry("value", (BATCH, "full_kv_heads", PAST, "full_head_dim"))


def state_entries(config) -> list[tuple[StateEntry, ...]]:
    """What each layer of ``config`` carries between steps, in graph order."""
    entries = (LATENT, ROPE_KEY) if getattr(config, "kv_lora_rank", None) is not None else (KEY, VALUE)
    linear = getattr(config, "is_linear_attention_layer", lambda i: False)
    # Gemma 4: full-attention layers whose head dim or key/value heads differ from the sliding ones
    full = bool(getattr(config, "full_attention_head_dim", None) or getattr(config, "full_attention_kv_heads", None))

    def layer(i: int) -> tuple[StateEntry, ...]:
        if linear(i):
            return (CONV_STATE, RECURRENT_STATE)
        if full and config.is_full_attention(i):
            return (FULL_KEY, FULL_VALUE)
        return entries

    return [layer(i) for i in range(config.num_hidden_layers)]


def _entry_name(entry: StateEntry | str) -> str:
    return entry.name if isinstance(entry, StateEntry) else entry


def past_name(layer: int, entry: StateEntry | str) -> str:
    """``past_key_values.{layer}.{entry}``: the graph input of a layer's state."""
    return f"{PAST_PREFIX}{layer}.{_entry_name(entry)}"


def present_name(layer: int, entry: StateEntry | str) -> str:
    """``present.{layer}.{entry}``: the graph output of a layer's state after the step."""
    return f"{PRESENT_PREFIX}{layer}.{_entry_name(entry)}"


@dataclass(frozen=True)
class StateContract:
    """Every layer's state entries with the config sizes resolved."""

    layers: tuple[tuple[StateEntry, ...], ...]
    sizes: tuple[tuple[str, int], ...]  # (symbolic dim, size), e.g. (("head_dim", 16), ("kv_heads", 2))

    @classmethod
    def from_config(cls, config) -> StateContract:
        layers = tuple(tuple(e) for e in state_entries(config))
        used = {d for layer in layers for e in layer for d in e.dims if d in SIZES}
        sizes = tuple(sorted((dim, int(getattr(config, SIZES[dim]))) for dim in used))
        return cls(layers=layers, sizes=sizes)

    @classmethod
    def key_value(cls, num_layers: int, kv_heads: int, head_dim: int) -> StateContract:
        """Key and value in every layer: what folders written before the contract was recorded carry."""
        return cls(layers=((KEY, VALUE),) * num_layers, sizes=(("head_dim", int(head_dim)), ("kv_heads", int(kv_heads))))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def size_map(self) -> dict[str, int]:
        return dict(self.sizes)

    def entries(self, layer: int) -> tuple[StateEntry, ...]:
        return self.layers[layer]

    def past_names(self, layer: int) -> tuple[str, ...]:
        return tuple(past_name(layer, e) for e in self.layers[layer])

    def present_names(self, layer: int) -> tuple[str, ...]:
        return tuple(present_name(layer, e) for e in self.layers[layer])

    def all_past_names(self) -> list[str]:
        return [n for i in range(self.num_layers) for n in self.past_names(i)]

    def all_present_names(self) -> list[str]:
        return [n for i in range(self.num_layers) for n in self.present_names(i)]

    def pairs(self) -> list[tuple[str, str]]:
        """(present name, past name) of every entry: what a step feeds back into the next."""
        return [(present_name(i, e), past_name(i, e)) for i, layer in enumerate(self.layers) for e in layer]

    @cached_property
    def _by_name(self) -> dict[str, tuple[int, StateEntry]]:
        return {name(i, e): (i, e) for i, layer in enumerate(self.layers) for e in layer
                for name in (past_name, present_name)}

    def entry_of(self, name: str) -> tuple[int, StateEntry]:
        """(layer, entry) of a state input ``past_key_values.{i}.{entry}`` or output ``present.{i}.{entry}``."""
        if name not in self._by_name:
            raise ValueError(f"{name!r} is no state input or output of this model; they are {self.all_past_names()[:4]}, ...")
        return self._by_name[name]

    def shape(self, layer: int, entry: StateEntry | str, batch: int, past: int) -> tuple[int, ...]:
        return self._entry(layer, entry).shape(self.size_map, batch, past)

    def entry_dtype(self, layer: int, entry: StateEntry | str, model_dtype: str) -> str:
        return self._entry(layer, entry).element_dtype(model_dtype)

    def empty_past(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Graph input name -> the shape of the past that starts a prefill (0 positions)."""
        sizes = self.size_map
        return {past_name(i, e): e.shape(sizes, batch, 0) for i, layer in enumerate(self.layers) for e in layer}

    def shapes(self, batch: int, past: int) -> dict[str, tuple[int, ...]]:
        """Graph input name -> its shape at ``batch`` and ``past`` positions."""
        sizes = self.size_map
        return {past_name(i, e): e.shape(sizes, batch, past) for i, layer in enumerate(self.layers) for e in layer}

    def past_length(self, shapes: Mapping[str, Any]) -> int:
        """The positions a past holds, read from the shape of the first growing entry in ``shapes`` (0 if none)."""
        for i, layer in enumerate(self.layers):
            for e in layer:
                if e.grows and past_name(i, e) in shapes:
                    return int(tuple(shapes[past_name(i, e)])[e.concat_axis])
        return 0

    def _entry(self, layer: int, entry: StateEntry | str) -> StateEntry:
        name = _entry_name(entry)
        for e in self.layers[layer]:
            if e.name == name:
                return e
        raise ValueError(f"layer {layer} carries no state {name!r}; it carries {', '.join(e.name for e in self.layers[layer])}")

    def to_dict(self) -> dict[str, Any]:
        """``io["state"]`` of ``moetrt.json``: each distinct entry once, then each layer's entry names.

        Where one name has several shapes (Gemma 4's full-attention key and value), a layer refers to
        its entry by its index in ``entries`` instead of by name.
        """
        entries: list[StateEntry] = list(dict.fromkeys(e for layer in self.layers for e in layer))
        names = [e.name for e in entries]

        def ref(e: StateEntry) -> str | int:
            return e.name if names.count(e.name) == 1 else entries.index(e)

        return {
            "entries": [e.to_dict() for e in entries],
            "layers": [[ref(e) for e in layer] for layer in self.layers],
            "sizes": dict(self.sizes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StateContract:
        listed = [StateEntry.from_dict(d) for d in data["entries"]]
        entries = {e.name: e for e in listed}
        try:
            layers = tuple(tuple(listed[ref] if isinstance(ref, int) else entries[ref] for ref in layer)
                           for layer in data["layers"])
        except (KeyError, IndexError) as exc:
            raise ValueError(f"io.state.layers names state {exc.args[0]!r}, which io.state.entries does not declare") from None
        return cls(layers=layers, sizes=tuple(sorted((str(k), int(v)) for k, v in data["sizes"].items())))

    @classmethod
    def read(cls, meta: Mapping[str, Any], config) -> StateContract:
        """The contract recorded in ``meta["io"]["state"]``; key/value per layer for folders written before it."""
        recorded = (meta.get("io") or {}).get("state")
        return cls.from_config(config) if recorded is None else cls.from_dict(recorded)


def state_contract(config) -> StateContract:
    """The state contract of ``config``."""
    return StateContract.from_config(config)
