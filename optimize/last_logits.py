"""Pass: logits of the last position only (transformers' ``logits_to_keep=1``).

Generation reads one row of logits per step: the last position's. A prefill of S tokens still
runs the final norm and the lm_head on all S positions, and the lm_head is large (on bench-small,
d 1024 x vocab 32000, a quarter of a 256-token prefill's FLOPs). This pass slices the hidden
states to the last position before the final norm::

    hidden [B, S, D] -> Slice(starts=[-1], ends=[INT64_MAX], axes=[1]) -> [B, 1, D]
                     -> final norm -> lm_head -> logits [B, 1, V]

The rank stays 3, so ``logits[:, -1]`` (what the generate loop reads) is the same row as before.
``present.*`` and the router outputs are untouched: every position still runs every decoder
layer. With left padding (batched generation) the last position is a real token in every row.

The pattern, found from the ``logits`` output backwards and refused with the reason when it is
not there:

1. ``logits`` is the output of the lm_head ``MatMul`` (through ``Cast``/``Identity`` only);
2. its input is the final norm's output: either a fused norm op (``SimplifiedLayerNormalization``,
   ``LayerNormalization``) or the exported RMSNorm (``Pow``, ``ReduceMean`` over the last axis,
   ``Add``, ``Sqrt``, ``Reciprocal``, ``Mul``, with ``Cast`` in and out of float32 in fp16/bf16
   exports);
3. the hidden states are the value that norm normalizes (before any ``Cast``): the last decoder
   layer's residual output. Every op between it and the lm_head must work position by position
   (elementwise, or reducing the last axis only); only those ops read the sliced value, so any
   other consumer of the hidden states keeps all positions.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir

from moetrt.errors import UnsupportedModelError

from ._common import ORT_DOMAIN, PassResult

__all__ = ["last_logits", "find_last_logits_pattern", "LastLogitsPattern"]

# ops between the hidden states and the lm_head that compute each position on its own
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity", "Neg", "Exp"}
_FUSED_NORMS = {("", "SimplifiedLayerNormalization"), ("", "LayerNormalization"),
                (ORT_DOMAIN, "SimplifiedLayerNormalization")}
_MAX_NORM_OPS = 32  # an RMSNorm is 6-9 ops; more means something else sits before the lm_head
_INT64_MAX = np.iinfo(np.int64).max


class LastLogitsPattern:
    """Where the pass cuts: the lm_head, the hidden states before the final norm, and the ops between."""

    def __init__(self, lm_head: ir.Node, hidden: ir.Value, norm_nodes: list[ir.Node], after_head: list[ir.Node]):
        self.lm_head = lm_head  # MatMul: [B, S, D] x [D, V]
        self.hidden = hidden  # [B, S, D], the last decoder layer's output
        self.norm_nodes = norm_nodes  # the final norm's ops, reading ``hidden``
        self.after_head = after_head  # Cast/Identity between the lm_head and the logits output


def _fail(reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"--last-logits: {reason}; the pass expects logits = lm_head(final RMSNorm(last decoder layer's output)), as "
        "`moetrt export` writes it: optimize without --last-logits (all positions' logits), or re-export the model "
        "with `moetrt export`"
    )


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _last_axis_only(node: ir.Node, rank: int | None) -> bool:
    """A reduction or norm over the last axis only (so it stays within one position)."""
    if node.op_type == "ReduceMean":
        axes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None and "axes" in node.attributes:  # opset < 18
            axes = list(node.attributes["axes"].as_ints())
        return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
    return axis == -1 or (rank is not None and axis == rank - 1)


def _hidden_of_decomposed_norm(reduce: ir.Node) -> ir.Value:
    """The value an exported RMSNorm normalizes: ReduceMean(Pow(Cast?(x), 2)) -> x."""
    value = reduce.inputs[0]
    producer = value.producer()
    if producer is not None and producer.op_type == "Pow":
        value = producer.inputs[0]
    elif producer is not None and producer.op_type == "Mul" and producer.inputs[0] is producer.inputs[1]:
        value = producer.inputs[0]
    else:
        raise _fail(f"the final norm's ReduceMean ({reduce.name}) does not average a square (Pow or x * x)")
    while value.producer() is not None and value.producer().op_type == "Cast":  # fp16/bf16: statistics in float32
        value = value.producer().inputs[0]
    return value


def find_last_logits_pattern(model: ir.Model) -> LastLogitsPattern:
    """Locate the lm_head, the final norm and the hidden states before it; raise naming what is missing."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None:
        raise _fail(f"the graph has no output named 'logits' (outputs: {', '.join(v.name for v in graph.outputs)})")
    after_head: list[ir.Node] = []
    node = logits.producer()
    while node is not None and node.domain == "" and node.op_type in ("Cast", "Identity"):
        after_head.append(node)
        node = node.inputs[0].producer()
    if node is None or node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
        found = "a graph input" if node is None else f"{node.domain + '::' if node.domain else ''}{node.op_type}"
        raise _fail(f"'logits' is computed by {found}, not by an lm_head MatMul")
    if node.op_type == "Gemm":
        raise _fail(f"the lm_head is a Gemm ({node.name}) on flattened positions, not a MatMul on [B, S, D]")
    lm_head = node
    head_input = lm_head.inputs[0]
    first = head_input.producer()
    if first is None:
        raise _fail("the lm_head reads a graph input, not the final norm's output")

    # the final norm: one fused op, or the exported ops around one ReduceMean
    if (first.domain, first.op_type) in _FUSED_NORMS:
        if not _last_axis_only(first, len(first.inputs[0].shape) if first.inputs[0].shape is not None else None):
            raise _fail(f"the final norm {first.name} does not normalize the last axis")
        hidden = first.inputs[0]
    else:
        # breadth first: the norm's ReduceMean is a few ops away, while the elementwise residual adds
        # before the norm lead back through every layer
        reduce, frontier, seen = None, deque([first]), set()
        while frontier and reduce is None and len(seen) < _MAX_NORM_OPS:
            n = frontier.popleft()
            if n in seen:
                continue
            seen.add(n)
            if n.domain == "" and n.op_type == "ReduceMean":
                reduce = n
            elif n.domain == "" and n.op_type in _ELEMENTWISE:
                frontier += [v.producer() for v in n.inputs if v is not None and v.producer() is not None]
        if reduce is None:
            raise _fail(f"found no ReduceMean within {len(seen)} elementwise ops before the lm_head, where the final "
                        "RMSNorm computes its statistic")
        hidden = _hidden_of_decomposed_norm(reduce)

    # every op on a path hidden -> lm_head works position by position
    norm_nodes: list[ir.Node] = []
    depends: dict[ir.Node, bool] = {}

    def reads_hidden(n: ir.Node) -> bool:
        if n in depends:
            return depends[n]
        depends[n] = False  # no cycles in a graph; this guards the recursion only
        if len(depends) > 4 * _MAX_NORM_OPS:
            raise _fail(f"more than {_MAX_NORM_OPS} ops between the hidden states and the lm_head")
        result = False
        for v in n.inputs:
            if v is None or v.const_value is not None or v.is_initializer():
                continue
            if v is hidden:
                result = True
            elif v.producer() is None:
                raise _fail(f"the final norm ({n.name}) reads the graph input {v.name!r}")
            elif reads_hidden(v.producer()):
                result = True
        depends[n] = result
        if result:
            rank = len(n.inputs[0].shape) if n.inputs[0] is not None and n.inputs[0].shape is not None else None
            elementwise = n.domain == "" and n.op_type in _ELEMENTWISE
            reduces = (n.domain == "" and n.op_type == "ReduceMean") or (n.domain, n.op_type) in _FUSED_NORMS
            if not (elementwise or reduces):
                raise _fail(f"{n.op_type} {n.name} between the hidden states and the lm_head may mix positions")
            if reduces and not _last_axis_only(n, rank):
                raise _fail(f"{n.op_type} {n.name} in the final norm reduces another axis than the last")
            norm_nodes.append(n)
        return result

    if not reads_hidden(first):
        raise _fail("the lm_head's input does not depend on the hidden states found before the final norm")
    if hidden.shape is not None and len(hidden.shape) != 3:
        raise _fail(f"the hidden states {hidden.name} have rank {len(hidden.shape)}, not [B, S, D]")
    return LastLogitsPattern(lm_head, hidden, norm_nodes, after_head)


def _one_position(value: ir.Value) -> None:
    """[B, S, ...] -> [B, 1, ...] in the value's recorded shape (when it has one)."""
    if value.shape is not None and len(value.shape) >= 2:
        dims = list(value.shape.dims)
        dims[1] = 1
        value.shape = ir.Shape(dims)


def last_logits(model: ir.Model) -> PassResult:
    """Slice the hidden states to the last position before the final norm: ``logits`` [B, S, V] -> [B, 1, V]."""
    pattern = find_last_logits_pattern(model)
    graph, hidden = model.graph, pattern.hidden
    names = {"starts": [-1], "ends": [_INT64_MAX], "axes": [1]}
    constants = []
    for key, ints in names.items():
        name = f"last_logits.{key}"
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(ints, np.int64), name=name))
        graph.register_initializer(value)
        constants.append(value)
    sliced = ir.node("Slice", [hidden, *constants], name="last_logits.slice",
                     outputs=[ir.Value(name=f"{hidden.name}.last")])
    last = sliced.outputs[0]
    last.type, last.shape = hidden.type, hidden.shape
    _one_position(last)  # [B, 1, D]
    graph.insert_before(pattern.lm_head, sliced)
    for node in pattern.norm_nodes:
        for i, value in enumerate(node.inputs):
            if value is hidden:
                node.replace_input_with(i, last)
        for out in node.outputs:
            _one_position(out)
    for node in (pattern.lm_head, *pattern.after_head):
        for out in node.outputs:
            _one_position(out)
    graph.sort()  # the slice before the norm ops that now read it
    return PassResult("last_logits", count=1, details={
        "lm_head": pattern.lm_head.name, "hidden": hidden.name, "norm_ops": len(pattern.norm_nodes),
        "logits": "last position only: [B, 1, V]",
    })
