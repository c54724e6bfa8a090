"""The one interface every back end (torch, ort, trt) fills, and the facts the generate loop needs.

A back end runs one forward step of the model graph::

    outputs = backend.forward(feeds)

with exactly the names of the exported graph (DESIGN.md, "Exported model folder"):

    feeds    input_ids                  int64 [B, S]
             attention_mask             int64 [B, P+S]   (1 = real token, 0 = left padding)
             position_ids               int64 [B, S]
             past_key_values.{i}.key    [B, G, P, Hd]    model dtype, one pair per layer i (P may be 0)
             past_key_values.{i}.value  [B, G, P, Hd]    (the entries of moetrt.state: ``spec.state``)
    outputs  logits                     float32 [B, S, V]            (NumPy, on the host)
             present.{i}.key|value      [B, G, P+S, Hd]              (back-end native, fed back as is)
             router_weights.{i}         float32 [B*S, K]             per MoE layer i, when the back end has them
             router_indices.{i}         int32 [B*S, K]

``input_ids``, ``attention_mask`` and ``position_ids`` come in as NumPy arrays. The KV cache is
opaque to the loop: whatever a back end returns as ``present.*`` (a torch tensor, an ORT
``OrtValue`` on the GPU, a TensorRT device buffer) it receives back unchanged as the next
step's ``past_key_values.*``, so the cache never has to leave the device. ``empty_past`` gives
the past of length 0 that starts a prefill. ``logits`` and the router outputs come back as
NumPy arrays on the host, which is where sampling and statistics happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moetrt.config import MoEConfig
from moetrt.dtypes import ELEMENT_NAMES, dtype_name, numpy_dtype
from moetrt.state import KEY, VALUE, StateContract, past_name, present_name, state_contract

__all__ = ["Backend", "ModelSpec", "Feeds", "past_names", "present_names", "router_names", "KV_DTYPES"]

# a feed or output value: a NumPy array, or a back-end native array for the KV cache
Feeds = dict[str, Any]

# the export's dtype names -> element names (bfloat16 has no NumPy dtype; back ends keep it native)
KV_DTYPES = dict(ELEMENT_NAMES)


def past_names(layer: int, state: StateContract | None = None) -> tuple[str, ...]:
    """The graph inputs of ``layer``'s state (``state``'s entries; key and value without one)."""
    return state.past_names(layer) if state is not None else (past_name(layer, KEY), past_name(layer, VALUE))


def present_names(layer: int, state: StateContract | None = None) -> tuple[str, ...]:
    """The graph outputs of ``layer``'s state after a step."""
    return state.present_names(layer) if state is not None else (present_name(layer, KEY), present_name(layer, VALUE))


def router_names(layer: int) -> tuple[str, str]:
    return f"router_weights.{layer}", f"router_indices.{layer}"


@dataclass(frozen=True)
class ModelSpec:
    """What the generate loop needs to know about a model, whatever runs it."""

    num_layers: int
    num_kv_heads: int  # G
    head_dim: int  # Hd
    kv_dtype: str  # "float32" | "float16" | "bfloat16"
    vocab_size: int  # V
    max_positions: int  # max_position_embeddings
    moe_layers: tuple[int, ...]  # layer indices that hold a router
    num_experts: int  # E
    experts_per_token: int  # K
    router_outputs: bool  # whether forward returns router_weights.{i} / router_indices.{i}
    state: StateContract | None = None  # what each layer carries between steps; None: the config's (key, value)

    def __post_init__(self) -> None:
        if self.state is None:
            object.__setattr__(self, "state", StateContract.key_value(self.num_layers, self.num_kv_heads, self.head_dim))

    @classmethod
    def from_config(
        cls, config: MoEConfig, kv_dtype: str, router_outputs: bool, state: StateContract | None = None
    ) -> ModelSpec:
        assert kv_dtype in KV_DTYPES.values(), kv_dtype
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            kv_dtype=kv_dtype,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            moe_layers=tuple(config.moe_layers),
            num_experts=config.num_experts,
            experts_per_token=config.num_experts_per_tok,
            router_outputs=router_outputs,
            state=state if state is not None else state_contract(config),
        )

    def kv_shape(self, batch: int, past: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, past, self.head_dim)  # [B, G, P, Hd]

    def state_shape(self, name: str, batch: int, past: int) -> tuple[int, ...]:
        """The shape of the state input ``past_key_values.{i}.{entry}`` (or ``present.{i}.{entry}``) at ``past``."""
        return self.state.entry_of(name)[1].shape(self.state.size_map, batch, past)

    def state_element_dtype(self, name: str) -> str:
        """The element name (float32, float16, bfloat16) of a state input or output."""
        return KV_DTYPES[self.state.entry_of(name)[1].element_dtype(dtype_name(self.kv_dtype))]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.state.all_past_names()]

    @property
    def output_names(self) -> list[str]:
        names = ["logits", *self.state.all_present_names()]
        if self.router_outputs:
            for i in self.moe_layers:
                names += router_names(i)
        return names


@runtime_checkable
class Backend(Protocol):
    """One forward step of the model; see the module docstring for the names and shapes.

    ``name`` is ``"torch"``, ``"ort"`` or ``"trt"``; ``device`` is where it runs (``"cpu"``,
    ``"cuda:0"``); ``config`` the model's :class:`MoEConfig`. ``forward`` must compute router outputs when ``spec.router_outputs`` and
    ``want_router`` are both true, and may skip them otherwise.
    """

    name: str
    device: str
    config: MoEConfig
    spec: ModelSpec

    def forward(self, feeds: Feeds, want_router: bool = False) -> Feeds: ...

    def empty_past(self, batch: int) -> Feeds: ...


def numpy_empty_past(spec: ModelSpec, batch: int) -> Feeds:
    """A past of length 0 as NumPy arrays (bfloat16 through ml_dtypes)."""
    return {name: np.zeros(shape, dtype=numpy_dtype(spec.state_element_dtype(name)))  # [B, G, 0, Hd] for K/V
            for name, shape in spec.state.empty_past(batch).items()}

