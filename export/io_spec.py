"""Names, dtypes and dynamic axes of the exported graph (the onnxruntime-genai / optimum naming).

One graph serves prefill and decode: batch, sequence and past length are all dynamic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moetrt.config import MoEConfig

__all__ = ["TensorSpec", "IOSpec", "io_spec", "DTYPES", "BATCH", "SEQ", "PAST", "TOTAL", "TOKENS"]

# the dtypes an export can take; router math and logits stay float32 in every one
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

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

    def to_dict(self) -> dict:
        return {
            "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
        }

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def io_spec(config: MoEConfig, dtype: str = "fp32", router_outputs: bool = False) -> IOSpec:
    """The graph inputs and outputs for ``config`` exported in ``dtype``."""
    kv_dtype = DTYPES[dtype]
    kv_in = (BATCH, config.num_key_value_heads, PAST, config.head_dim)
    kv_out = (BATCH, config.num_key_value_heads, TOTAL, config.head_dim)
    inputs = [
        TensorSpec("input_ids", "int64", (BATCH, SEQ)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
        TensorSpec("position_ids", "int64", (BATCH, SEQ)),
    ]
    outputs = [TensorSpec("logits", "float32", (BATCH, SEQ, config.vocab_size))]
    for i in range(config.num_hidden_layers):
        inputs += [TensorSpec(past_name(i, k), kv_dtype, kv_in) for k in ("key", "value")]
        outputs += [TensorSpec(present_name(i, k), kv_dtype, kv_out) for k in ("key", "value")]
    if router_outputs:
        k = config.num_experts_per_tok
        for i in config.moe_layers:
            outputs += [
                TensorSpec(f"router_weights.{i}", "float32", (TOKENS, k)),
                TensorSpec(f"router_indices.{i}", "int32", (TOKENS, k)),
            ]
    return IOSpec(tuple(inputs), tuple(outputs))
