"""Pass: the canonical export -> the trt-target ONNX that TensorRT's ONNX parser builds from.

What the parser needs, and what this pass checks (:func:`tensorrt_problems`) and rewrites
(:func:`prepare_for_tensorrt`):

- **no string or sparse Constants** anywhere (the parser rejects ``value_string(s)`` and
  ``sparse_value``): the function bodies are specialised per string attribute at export.
- **plugins, or function bodies** (``plugins="none"``: the node loses ``plugin_namespace`` and the
  parser inlines its standard-op body, whose sparse path has no If: TensorRT's compiler cannot
  build data-dependent shapes inside an If branch). With plugins, the parser prefers a model-local function over a plugin
  unless the node has a ``plugin_namespace`` attribute; every ``moetrt`` node carries
  ``plugin_namespace="moetrt"`` and an ``aot`` attribute (1: strict AOT implementation, 0:
  strict JIT), which the parser reads per node. Attributes are put in the plugin's registration
  order; INT attributes must fit int32 (the parser reads them as ``int32_t``).
- **one kernel per AOT plugin**: with ``plugins="aot"`` each ``SparseMoE`` becomes
  ``MoEAlign -> MoEGateUp -> MoEDown -> MoECombine`` (see :mod:`moetrt.ops.plugins.aot`), with the
  block sizes for the engine's optimal token count as attributes.
- **no ScatterND/ScatterElements with ``reduction``** anywhere, function bodies and ``If``
  branches included (the parser rejects it; a body runs when no plugin is found).
- **strongly typed**: TensorRT 11 builds only strongly typed networks (and moetrt builds them
  strongly typed on 10.x too), where an elementwise op's inputs must share one type; ONNX lets
  ``Pow`` take a base and an exponent of different types, so the exponent gets an explicit
  ``Cast``. Any other standard op with mixed float inputs is reported.
- **named nodes**: every node of the main graph has a unique name (the layer names in
  TensorRT's errors and profiles).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from moetrt.errors import MoetrtError
from moetrt.ops._onnx import DOMAIN
from moetrt.ops.plugins import BIAS_FLAGS, PLUGIN_ATTRIBUTES, PLUGIN_MODES, PLUGIN_NAMESPACE
from moetrt.ops.plugins.aot import SPARSE_MOE_PLUGINS, sparse_moe_attributes, sparse_moe_plan
from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE_SPEC
from moetrt.ops.topk_routing import SPEC as TOPK_ROUTING_SPEC
from moetrt.ops.topk_routing import node_version as topk_routing_node_version

from .._common import FLOAT_TYPES, PassResult, refusal

__all__ = ["prepare_for_tensorrt", "tensorrt_problems", "SAME_TYPE_OPS", "INT32_RANGE"]

INT32_RANGE = (-(2**31), 2**31 - 1)
# standard ops whose float inputs TensorRT needs in one type (input indices; None: all)
SAME_TYPE_OPS: dict[str, tuple[int, ...] | None] = {
    op: None for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Equal", "Less", "Greater",
                        "LessOrEqual", "GreaterOrEqual", "MatMul", "Gemm", "Concat")
} | {"Where": (1, 2)}
_STRING_CHOICES = {("TopKRouting", "scoring"): ("softmax", "sigmoid"),
                   ("SparseMoE", "activation"): SPARSE_MOE_SPEC.attr("activation").allowed,
                   ("MoEGateUp", "activation"): SPARSE_MOE_SPEC.attr("activation").allowed}
_STRING_ATTRIBUTE_TYPES = (ir.AttributeType.STRING, ir.AttributeType.STRINGS)
_ELEMENT_SIZE = {ir.DataType.FLOAT: 4, ir.DataType.FLOAT16: 2, ir.DataType.BFLOAT16: 2}


def _all_nodes(model: ir.Model):
    """(where, node) for every node: main graph, subgraphs and function bodies."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield "graph", node
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            yield f"function {function.domain}::{function.name}", node


def tensorrt_problems(model: ir.Model, plugins: str | None = None) -> list[str]:
    """What in ``model`` TensorRT's parser would reject or misread; empty when it is ready.

    ``plugins``: "aot" / "jit" also checks each moetrt node's ``aot`` attribute (a prepared model);
    "none" checks that each moetrt node has its function body instead.
    """
    problems = []
    for where, node in _all_nodes(model):
        label = f"{node.op_type} node {node.name!r} ({where})"
        if node.op_type in ("ScatterND", "ScatterElements") and node.domain in ("", "ai.onnx"):
            reduction = node.attributes.get("reduction")
            if reduction is not None and reduction.as_string() != "none":
                problems.append(f"{label}: reduction={reduction.as_string()!r}, which TensorRT's parser rejects")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and any(
                name in ("sparse_value", "value_string", "value_strings") or attr.type in _STRING_ATTRIBUTE_TYPES
                for name, attr in node.attributes.items()):
            problems.append(f"{label}: a sparse or string Constant, which TensorRT's parser rejects; "
                            "re-export the model (its function bodies are specialised per string attribute)")
        if node.domain not in ("", "ai.onnx", DOMAIN):
            problems.append(f"{label}: domain {node.domain!r} is not a TensorRT op (an ONNX Runtime lowering?); "
                            "build from the canonical export")
    names = Counter(node.name for node in model.graph)
    for node in model.graph:
        label = f"{node.op_type} node {node.name!r}"
        if not node.name:
            problems.append(f"a {node.op_type} node has no name")
        elif names[node.name] > 1:
            problems.append(f"{label}: the name is used by {names[node.name]} nodes")
        if node.domain == DOMAIN and plugins == "none":
            if node.op_identifier() not in model.functions:
                problems.append(f"{label}: no function body in the model, which plugins='none' builds from; "
                                "re-export the model")
        elif node.domain == DOMAIN:
            problems += [f"{label}: {p}" for p in _plugin_node_problems(node, plugins)]
        elif node.domain in ("", "ai.onnx") and node.op_type in SAME_TYPE_OPS:
            dtypes = _float_input_types(node, SAME_TYPE_OPS[node.op_type])
            if len(dtypes) > 1:
                problems.append(f"{label}: mixes float inputs {sorted(d.name for d in dtypes)}, which a strongly "
                                "typed TensorRT network rejects; cast them to one type")
    return problems


def _float_input_types(node: ir.Node, indices: tuple[int, ...] | None) -> set[ir.DataType]:
    values = [v for i, v in enumerate(node.inputs) if v is not None and (indices is None or i in indices)]
    return {v.dtype for v in values if v.dtype in FLOAT_TYPES}


def _plugin_node_problems(node: ir.Node, plugins: str | None) -> list[str]:
    if node.op_type not in PLUGIN_ATTRIBUTES:
        return [f"no moetrt TensorRT plugin is named {node.op_type} (plugins: {', '.join(PLUGIN_ATTRIBUTES)})"]
    out = []
    namespace = node.attributes.get("plugin_namespace")
    if namespace is None or namespace.as_string() != PLUGIN_NAMESPACE:
        out.append(f"needs plugin_namespace={PLUGIN_NAMESPACE!r} so the parser picks the plugin over the function body")
    for name in PLUGIN_ATTRIBUTES[node.op_type]:
        attr = node.attributes.get(name)
        if attr is None and plugins is None and node.op_type == "SparseMoE":
            continue  # a canonical node leaves defaults off; prepare_for_tensorrt writes them (sparse_moe_attributes)
        if attr is None:
            out.append(f"lacks attribute {name!r}, which the plugin declares (the parser passes no defaults)")
        elif attr.type == ir.AttributeType.INT and not INT32_RANGE[0] <= attr.as_int() <= INT32_RANGE[1]:
            out.append(f"attribute {name}={attr.as_int()} does not fit int32, as TensorRT's parser reads it")
        elif (node.op_type, name) in _STRING_CHOICES and attr.as_string() not in _STRING_CHOICES[(node.op_type, name)]:
            out.append(f"attribute {name}={attr.as_string()!r} is not one of {_STRING_CHOICES[(node.op_type, name)]}")
    if plugins is not None:
        aot = node.attributes.get("aot")
        want = 1 if plugins == "aot" else 0
        if aot is None or aot.as_int() != want:
            out.append(f"needs aot={want} for plugins={plugins!r}")
        if plugins == "aot" and node.op_type == "SparseMoE":
            out.append("has no AOT implementation: plugins='aot' runs it as " + " -> ".join(SPARSE_MOE_PLUGINS))
    return out


# --- rewrite -----------------------------------------------------------------------------------
def _name_nodes(graph: ir.Graph) -> int:
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        if name != node.name:
            node.name = name
            renamed += 1
        seen.add(name)
    return renamed


def _cast_pow_exponents(graph: ir.Graph) -> int:
    casts = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type != "Pow":
            continue
        base, exponent = node.inputs[0], node.inputs[1]
        if base.dtype in FLOAT_TYPES and exponent.dtype in FLOAT_TYPES and base.dtype != exponent.dtype:
            cast = ir.node("Cast", [exponent], {"to": base.dtype}, name=f"{node.name}/exponent_cast")
            cast.outputs[0].name = f"{node.name}/exponent"
            cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(base.dtype), exponent.shape
            graph.insert_before(node, cast)
            node.replace_input_with(1, cast.outputs[0])
            casts += 1
    return casts


def _set_attributes(node: ir.Node, values: dict, aot: int) -> None:
    """Attributes in the plugin's registration order, then plugin_namespace and aot."""
    ordered = [ir.convenience.convert_attribute(k, values[k]) for k in PLUGIN_ATTRIBUTES[node.op_type]]
    ordered += [ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE), ir.AttrInt64("aot", aot)]
    node.attributes.clear()
    for attr in ordered:
        node.attributes[attr.name] = attr


def _attribute_values(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _static_shape(value: ir.Value, what: str, rank: int) -> tuple[int, ...]:
    shape = value.shape
    if shape is None or len(shape) != rank or not all(isinstance(d, int) for d in shape):
        raise MoetrtError(f"SparseMoE's {what} must have a static shape of rank {rank} for TensorRT, got {shape}; "
                          "re-export the model")
    return tuple(shape)


def _sparse_moe_bias(node: ir.Node, name: str) -> ir.Value | None:
    index = SPARSE_MOE_SPEC.input_index(name)
    return node.inputs[index] if index < len(node.inputs) else None


def _sparse_moe_present(node: ir.Node) -> set[str]:
    return {name for name in BIAS_FLAGS if _sparse_moe_bias(node, name) is not None}


def _sparse_moe_values(node: ir.Node) -> dict:
    """The SparseMoE plugin's attribute values for ``node``: its own, the spec's defaults, has_<bias> flags."""
    try:
        return sparse_moe_attributes(_attribute_values(node), _sparse_moe_present(node))
    except ValueError as exc:
        raise MoetrtError(f"SparseMoE node {node.name!r}: {exc}; re-export the model") from exc


def _sparse_moe_biases(graph: ir.Graph, node: ir.Node) -> dict[str, ir.Value]:
    """The node's optional bias inputs by name; a one-element zero of x's dtype stands in for each one it lacks
    (a plugin's inputs are fixed; its ``has_<input>`` attribute says the kernel must not read it)."""
    out = {}
    for name in BIAS_FLAGS:
        value = _sparse_moe_bias(node, name)
        if value is None:
            dtype = node.inputs[0].dtype
            value = ir.Value(name=f"{node.name}/no_{name}", type=ir.TensorType(dtype), shape=ir.Shape([1]),
                             const_value=ir.tensor(np.zeros(1, dtype=dtype.numpy())))
            graph.register_initializer(value)
        out[name] = value
    return out


def _aot_implements(values: dict) -> dict:
    """The SparseMoE attribute values the AOT plugins compute, for a node with ``values`` (reject by
    default: ``OpSpec.unsupported``): both activations of the Triton kernels, with ``alpha`` and
    ``limit`` as run-time floats (any value); both bias inputs (``has_<bias>``)."""
    return {"activation": ("silu", "clamped_swiglu"), "alpha": (values["alpha"],), "limit": (values["limit"],)}


def _aot_refusal(node: ir.Node) -> str | None:
    """Why the AOT plugins cannot compute this SparseMoE node, or None."""
    values = {name: value for name, value in _attribute_values(node).items() if name != "aot"}
    try:
        resolved = SPARSE_MOE_SPEC.resolve(values)
    except ValueError as exc:
        return f"{exc}; re-export the model"
    what = "the AOT decomposition (" + " -> ".join(SPARSE_MOE_PLUGINS) + ")"
    reason = refusal(SPARSE_MOE_SPEC, values, _aot_implements(resolved), what)
    return None if reason is None else f"{reason}; build with plugins='jit' or for ONNX Runtime"


def _plugin_refusal(node: ir.Node) -> str | None:
    """Why the SparseMoE plugins (JIT or AOT) cannot compute this node, or None: they take the spec's
    attributes but those in ``SPARSE_MOE_NOT_IN_PLUGINS`` (reject by default: weight_input=1, Llama 4)."""
    values = {name: value for name, value in _attribute_values(node).items() if name != "aot"}
    resolved = SPARSE_MOE_SPEC.resolve(values)
    implements = {n: (resolved[n],) for n in PLUGIN_ATTRIBUTES["SparseMoE"] if n in resolved}
    reason = refusal(SPARSE_MOE_SPEC, values, implements, "the SparseMoE plugins")
    return None if reason is None else f"{reason}; build with plugins='none' (the function body) or for ONNX Runtime"


def _routing_refusal(node: ir.Node) -> str | None:
    """Why the TopKRouting plugin cannot compute this node, or None (reject by default: its kernel takes
    the plugin attributes only, so a selection bias input or groups (version 2), norm_min (version 3) and
    sparsemixer (version 4) are refused)."""
    values = {name: value for name, value in _attribute_values(node).items() if name != "aot"}
    try:
        resolved = TOPK_ROUTING_SPEC.resolve(values)
    except ValueError as exc:
        return f"{exc}; re-export the model"
    what = "the TopKRouting plugin"
    implements = {n: (resolved[n],) for n in PLUGIN_ATTRIBUTES["TopKRouting"]}
    implements["scoring"] = _STRING_CHOICES[("TopKRouting", "scoring")]  # its kernel: softmax, sigmoid
    reason = refusal(TOPK_ROUTING_SPEC, values, implements, what)
    bias = TOPK_ROUTING_SPEC.input_index("selection_bias")
    if reason is None and bias < len(node.inputs) and node.inputs[bias] is not None:
        reason = f"{what} does not implement the selection_bias input"
    if reason is None:
        return None
    return f"{reason} (TopKRouting version {topk_routing_node_version(node)}); build for ONNX Runtime"


def _decompose_sparse_moe(graph: ir.Graph, node: ir.Node, num_tokens: int) -> None:
    """One SparseMoE node -> MoEAlign, MoEGateUp, MoEDown, MoECombine (AOT plugins, one kernel each)."""
    x, weights, indices, w_gate_up, w_down = node.inputs[:5]
    num_experts, two_f, hidden = _static_shape(w_gate_up, "w_gate_up [E, 2F, D]", 3)
    k = indices.shape[1] if indices.shape is not None and len(indices.shape) == 2 else None
    if not isinstance(k, int):
        router = indices.producer()
        k = router.attributes["k"].as_int() if router is not None and "k" in router.attributes else None
    if not isinstance(k, int):
        raise MoetrtError(f"SparseMoE node {node.name!r}: cannot tell k from its indices; re-export the model")
    if x.dtype not in _ELEMENT_SIZE:
        raise MoetrtError(f"SparseMoE node {node.name!r}: x is {x.dtype}, the plugins take float32/float16/bfloat16")
    plan = sparse_moe_plan(hidden, two_f // 2, num_experts, k, num_tokens, _ELEMENT_SIZE[x.dtype],
                           attributes=_attribute_values(node), biases=_sparse_moe_present(node))
    biases = _sparse_moe_biases(graph, node)
    new_nodes = []
    if indices.dtype != ir.DataType.INT32:
        cast = ir.node("Cast", [indices], {"to": ir.DataType.INT32}, name=f"{node.name}/indices_int32")
        cast.outputs[0].name, cast.outputs[0].type = f"{node.name}/indices_int32", ir.TensorType(ir.DataType.INT32)
        new_nodes.append(cast)
        indices = cast.outputs[0]

    def plugin(op: str, inputs: list, outputs: list[tuple[str, ir.DataType]]) -> ir.Node:
        new = ir.node(op, inputs, domain=DOMAIN, num_outputs=len(outputs), name=f"{node.name}/{op}")
        for value, (suffix, dtype) in zip(new.outputs, outputs):
            value.name, value.type = f"{node.name}/{suffix}", ir.TensorType(dtype)
        _set_attributes(new, plan[op], aot=1)
        new_nodes.append(new)
        return new

    i32 = ir.DataType.INT32
    align = plugin("MoEAlign", [indices], [("sorted_ids", i32), ("expert_ids", i32), ("num_padded", i32)])
    sorted_ids, expert_ids, num_padded = align.outputs
    gate_up = plugin("MoEGateUp", [x, w_gate_up, biases["b_gate_up"], sorted_ids, expert_ids, num_padded],
                     [("h", x.dtype)])
    down = plugin("MoEDown", [gate_up.outputs[0], w_down, biases["b_down"], weights, sorted_ids, expert_ids,
                              num_padded], [("slots", x.dtype)])
    combine = plugin("MoECombine", [down.outputs[0], indices], [("y", x.dtype)])
    graph.insert_before(node, new_nodes)
    y = node.outputs[0]
    combine.outputs[0].shape = y.shape
    ir.convenience.replace_all_uses_with(y, combine.outputs[0])
    for index, output in enumerate(graph.outputs):  # a graph output keeps its name
        if output is y:
            graph.outputs[index] = combine.outputs[0]
    name = y.name
    graph.remove(node, safe=True)
    combine.outputs[0].name = name


def prepare_for_tensorrt(model: ir.Model, plugins: str = "aot", num_tokens: int = 1) -> PassResult:
    """Make ``model`` (a canonical export, any precision) ready for TensorRT's parser, in place.

    ``plugins``: "aot" (PTX in the engine, runs without Python; SparseMoE as four plugins),
    "jit" (the Python implementations) or "none" (the nodes' function bodies, standard ops only:
    what ``trtexec --onnx`` builds, and the only mode of TensorRT for RTX, see ``engine_from_onnx``). ``num_tokens``: the token count (batch x sequence) the
    SparseMoE block sizes are chosen for, e.g. the profile's optimal one. Raises
    :class:`MoetrtError` listing whatever it cannot fix.
    """
    if plugins not in PLUGIN_MODES:
        raise MoetrtError(f"plugins must be one of {', '.join(PLUGIN_MODES)}, got {plugins!r}")
    graph = model.graph
    result = PassResult(f"prepare_for_tensorrt_{plugins}")
    casts = _cast_pow_exponents(graph)
    decomposed = 0
    skipped_ops: dict[str, str] = {}  # skipped node -> its op type (SparseMoE where not named)
    for node in list(graph):
        if node.domain != DOMAIN or node.op_type not in ("TopKRouting", "SparseMoE"):
            continue
        if plugins == "none":  # the parser inlines the function body of a node without plugin_namespace
            node.attributes.pop("plugin_namespace", None)
            result.count += 1
            continue
        values = _sparse_moe_values(node) if node.op_type == "SparseMoE" else _attribute_values(node)
        if node.op_type == "SparseMoE" and plugins == "jit":  # the plugin takes every input
            biases = _sparse_moe_biases(graph, node)
            node.resize_inputs(len(SPARSE_MOE_SPEC.inputs))
            for name, value in biases.items():
                node.replace_input_with(SPARSE_MOE_SPEC.input_index(name), value)
        missing = [a for a in PLUGIN_ATTRIBUTES[node.op_type] if a not in values]
        if missing:
            raise MoetrtError(f"{node.op_type} node {node.name!r} lacks attributes {missing}; re-export the model")
        if node.op_type == "TopKRouting":
            reason = _routing_refusal(node)
            if reason is not None:  # reject by default: left as it is, reported with the problems below
                result.skipped[node.name or "TopKRouting"] = reason
                skipped_ops[node.name or "TopKRouting"] = "TopKRouting"
                continue
        if node.op_type == "SparseMoE":
            reason = _plugin_refusal(node)
            if reason is not None:  # reject by default: left as it is, reported with the problems below
                result.skipped[node.name or "SparseMoE"] = reason
                continue
        if plugins == "aot" and node.op_type == "SparseMoE":
            reason = _aot_refusal(node)
            if reason is not None:  # reject by default: left as it is, reported with the problems below
                result.skipped[node.name or "SparseMoE"] = reason
                continue
            _decompose_sparse_moe(graph, node, max(1, num_tokens))
            decomposed += 1
        else:
            _set_attributes(node, values, aot=1 if plugins == "aot" else 0)
        result.count += 1
    if DOMAIN not in model.opset_imports:
        model.opset_imports[DOMAIN] = 1
    renamed = _name_nodes(graph)
    problems = [f"{skipped_ops.get(name, 'SparseMoE')} node {name!r}: {why}" for name, why in result.skipped.items()]
    problems += tensorrt_problems(model, plugins)
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise MoetrtError(f"the model cannot be built with TensorRT:\n  {shown}{more}")
    result.details = {"plugins": plugins, "sparse_moe_split": decomposed, "pow_casts": casts, "named_nodes": renamed,
                      "num_tokens": num_tokens}
    return result
