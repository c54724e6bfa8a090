"""Names, dtypes and dynamic axes of the exported graph (the onnxruntime-genai / optimum naming).

One graph serves prefill and decode: batch, sequence and past length are all dynamic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moetrt.config import MoEConfig
from moetrt.dtypes import ELEMENT_NAMES
from moetrt.state import StateContract, state_contract
from moetrt.state import past_name as _past_name
from moetrt.state import present_name as _present_name

__all__ = ["TensorSpec", "IOSpec", "io_spec", "DTYPES", "BATCH", "SEQ", "PAST", "TOTAL", "TOKENS"]

# the dtypes an export can take (-> their element names); router math and logits stay float32 in every one
DTYPES = dict(ELEMENT_NAMES)

BATCH, SEQ, PAST, TOTAL, TOKENS = (
    "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length", "num_tokens",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "int64", "float32", "float16", "bfloat16", "int32"
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: StateContract | None = None  # what each layer carries between steps (moetrt.state)

    def to_dict(self) -> dict:
        out = {
            "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
        }
        if self.state is not None:
            out["state"] = self.state.to_dict()
        return out

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def past_name(layer: int, kind: str) -> str:
    return _past_name(layer, kind)


def present_name(layer: int, kind: str) -> str:
    return _present_name(layer, kind)


def io_spec(config: MoEConfig, dtype: str = "fp32", router_outputs: bool = False) -> IOSpec:
    """The graph inputs and outputs for ``config`` exported in ``dtype``."""
    state = state_contract(config)
    sizes = state.size_map
    inputs = [
        TensorSpec("input_ids", "int64", (BATCH, SEQ)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
        TensorSpec("position_ids", "int64", (BATCH, SEQ)),
    ]
    outputs = [TensorSpec("logits", "float32", (BATCH, SEQ, config.vocab_size))]
    for i, entries in enumerate(state.layers):
        for e in entries:
            element = DTYPES[e.element_dtype(dtype)]
            inputs.append(TensorSpec(_past_name(i, e), element, e.symbolic_shape(sizes, BATCH, PAST)))
            outputs.append(TensorSpec(_present_name(i, e), element, e.symbolic_shape(sizes, BATCH, TOTAL)))
    if router_outputs:
        k = config.num_experts_per_tok
        for i in config.moe_layers:
            outputs += [
                TensorSpec(f"router_weights.{i}", "float32", (TOKENS, k)),
                TensorSpec(f"router_indices.{i}", "int32", (TOKENS, k)),
            ]
    return IOSpec(tuple(inputs), tuple(outputs), state)
