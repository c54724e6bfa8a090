"""torch -> canonical ONNX: the reference model traced with the dynamo exporter.

The two MoE torch ops translate to single nodes of domain ``moetrt`` (with ``plugin_namespace``
so TensorRT's parser picks our plugins); their model-local FunctionProtos are attached after
export (the dynamo exporter would inline onnxscript functions), so any ONNX runtime runs the
canonical model with no library of ours.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moetrt.artifact import FORMAT, FORMAT_VERSION, Progress, atomic_output_dir, check_output_dir, package_versions, write_artifact
from moetrt.checkpoint import TOKENIZER_FILES, checkpoint_sources, from_pretrained
from moetrt.errors import UnsupportedModelError
from moetrt.model import MoETransformer
from moetrt.ops._onnx import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, registered_schemas
from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE_SPEC, BodyVariant, gather_threshold, onnx_variant
from moetrt.ops.sparse_moe import onnx_function as sparse_moe_function
from moetrt.ops.sparse_moe import onnx_schema as sparse_moe_schema
from moetrt.ops.topk_routing import SPEC as TOPK_ROUTING_SPEC, onnx_function as topk_routing_function
from moetrt.ops.topk_routing import node_version as topk_routing_version, onnx_schemas as topk_routing_schemas
from moetrt.ops.topk_routing import onnx_variant as topk_routing_variant

from moetrt.dtypes import dtype_name, torch_dtype
from moetrt.state import StateContract

from .io_spec import BATCH, DTYPES, PAST, SEQ, TOKENS, TOTAL, IOSpec, io_spec

__all__ = ["onnx_from_torch", "trace_to_onnx", "attach_functions", "FORMAT", "FORMAT_VERSION", "MIN_OPSET", "DEFAULT_OPSET"]

MIN_OPSET = 19  # the opset the function bodies are written and tested for (Split num_outputs needs 18)
DEFAULT_OPSET = 20
EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights above 1 GiB go to model.onnx.data
TORCH_DTYPES = {d: torch_dtype(d) for d in DTYPES}
STAGES = ["load", "trace", "attach functions", "save"]
STREAMING_STAGES = ["read checkpoint index", "trace", "attach functions", "save"]
class _ExportWrapper(nn.Module):
    """Flat tensors in, flat tensors out, in the order of :func:`io_spec`."""

    def __init__(self, model: MoETransformer, router_outputs: bool, state: StateContract):
        super().__init__()
        self.model, self.router_outputs, self.state = model, router_outputs, state

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past, start = [], 0
        for entries in self.state.layers:  # each layer's state entries, in graph order
            past.append(tuple(past_flat[start:start + len(entries)]))
            start += len(entries)
        out = self.model(input_ids, attention_mask, position_ids, past, output_router=self.router_outputs)
        flat = [out.logits.float()]  # logits are float32 in every export dtype
        for tensors in out.past_key_values:
            flat += list(tensors)
        if self.router_outputs:
            for weights, indices in zip(out.router_weights, out.router_indices):
                flat += [weights, indices]
        return tuple(flat)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence a chatty library logger (the exporter warns about unrelated torchvision ops)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _translation_table() -> dict:
    """torch op -> one ONNX node of domain moetrt (traced by the exporter with onnxscript).

    A node carries the attributes its op's spec says it must (``OpSpec.non_default``): the ones
    version-1 nodes always had, and newer options only where they differ from their default.
    """
    import onnxscript

    moetrt_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def topk_routing(logits, k: int, scoring: str = "softmax", normalize: bool = False, scale: float = 1.0,
                     selection_bias=None, n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2_sum",
                     norm_min: float = 0.0, jitter_eps: float = 0.01):
        values = {"k": k, "scoring": scoring, "normalize": int(normalize), "scale": float(scale), "n_group": n_group,
                  "topk_group": topk_group, "group_scoring": group_scoring, "plugin_namespace": PLUGIN_NAMESPACE,
                  "norm_min": float(norm_min), "jitter_eps": float(jitter_eps)}
        attrs = TOPK_ROUTING_SPEC.non_default(values)
        inputs = (logits,) if selection_bias is None else (logits, selection_bias)
        version = TOPK_ROUTING_SPEC.version_for(values, ("selection_bias",) * (selection_bias is not None))
        if version == DOMAIN_VERSION:  # a version-1 node, emitted as it always was
            return moetrt_opset.TopKRouting(*inputs, **attrs, _outputs=2)
        return onnxscript.values.Opset(DOMAIN, version).TopKRouting(*inputs, **attrs, _outputs=2)

    def sparse_moe(x, weights, indices, w_gate_up, w_down, b_gate_up=None, b_down=None, activation: str = "silu",
                   alpha: float = 1.702, limit: float = 7.0, weight_input: int = 0):
        attrs = SPARSE_MOE_SPEC.non_default(
            {"activation": activation, "alpha": float(alpha), "limit": float(limit),
             "plugin_namespace": PLUGIN_NAMESPACE, "weight_input": int(weight_input)})
        return moetrt_opset.SparseMoE(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, **attrs)

    return {
        torch.ops.moetrt.TopKRouting.default: topk_routing,
        torch.ops.moetrt.SparseMoE.default: sparse_moe,
    }


def _example_inputs(cfg, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # sizes >= 2 and pairwise distinct, so the tracer keeps every axis symbolic
    batch, seq, past = 2, 5, 3
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    state, model_dtype = StateContract.from_config(cfg), dtype_name(dtype)
    kv = [torch.zeros(e.shape(state.size_map, batch, past), dtype=torch_dtype(e.element_dtype(model_dtype)))
          for entries in state.layers for e in entries]  # [B, G, P, Hd] for key/value
    return (input_ids, attention_mask, position_ids, *kv)


def _resolve_model(source: Any, progress: Progress) -> tuple[MoETransformer, str | None, Path | None]:
    """A model object, preset name or checkpoint folder -> (model, source description, folder)."""
    if isinstance(source, MoETransformer):
        return source, getattr(source, "source", None), getattr(source, "source_dir", None)
    if isinstance(source, (str, os.PathLike)):
        with progress.stage("load", str(source)):
            model = from_pretrained(source)
        return model, getattr(model, "source", None), getattr(model, "source_dir", None)
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        with progress.stage("load", type(source).__name__):
            return from_pretrained(source), None, None
    raise UnsupportedModelError(
        f"cannot export a {type(source).__name__}: pass a moetrt.MoETransformer, a transformers model of a "
        "supported family, a checkpoint folder or a preset name"
    )


def _checkpoint_folder(source: Any) -> Path | None:
    """``source`` as a checkpoint folder (streamed by default), or None (a model, a preset name)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return Path(source)
    return None


def _streamed_initializers(ir_model) -> list:
    from .streaming import StreamedTensor

    return [v.const_value for v in ir_model.graph.initializers.values() if isinstance(v.const_value, StreamedTensor)]


def _check_reads(streamed: list, allowed: int) -> None:
    """Internal invariant: each streamed weight is read at most ``allowed`` times (0 before saving)."""
    over = [f"{t.name} ({t.reads}x)" for t in streamed if t.reads > allowed]
    if over:
        raise AssertionError(f"streamed weights were read {'before saving' if not allowed else 'twice'}: "
                             f"{', '.join(over[:5])}")


def _rename_dims(ir_model, spec: IOSpec) -> None:
    """Give the graph's dynamic axes the onnxruntime-genai names (batch_size, ...)."""
    import onnx_ir as ir

    values = {v.name: v for v in list(ir_model.graph.inputs) + list(ir_model.graph.outputs)}
    for tensor in spec.inputs + spec.outputs:
        value = values[tensor.name]
        dims = [d if isinstance(d, int) else ir.SymbolicDim(d) for d in tensor.shape]
        old = value.shape
        if old is not None and len(old) != len(dims):
            raise AssertionError(f"exported {tensor.name} has rank {len(old)}, expected {len(dims)}")
        for got, want in zip(old or (), tensor.shape):
            if isinstance(want, int) and isinstance(got, int) and got != want:
                raise AssertionError(f"exported {tensor.name} has dim {got}, expected {want}")
            if isinstance(want, str) and isinstance(got, int):
                raise AssertionError(f"the tracer specialised dynamic axis {want} of {tensor.name} to {got}")
        value.shape = ir.Shape(dims)


def trace_to_onnx(module: nn.Module, args: tuple, dynamic_shapes, input_names, output_names, opset: int,
                  prepare: Callable[[Any], None] | None = None):
    """Trace ``module`` with the dynamo exporter; moetrt ops become single custom-domain nodes.

    ``prepare(model)`` runs on the traced graph before the exporter's optimizer does (the
    streaming export binds the fake-traced weights there). Returns the ``onnx_ir`` model,
    before the function bodies are attached.
    """
    with registered_schemas([*topk_routing_schemas(), sparse_moe_schema()]), warnings.catch_warnings(), \
            _quiet_logger("torch.onnx"), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
            custom_translation_table=_translation_table(), input_names=list(input_names),
            output_names=list(output_names), opset_version=opset, optimize=prepare is None, verbose=False,
        )
        if prepare is not None:
            prepare(program.model)
            program.optimize()  # what optimize=True runs, on the prepared graph
    return program.model


def attach_functions(ir_model, num_experts: int) -> dict[str, int]:
    """Attach the model-local FunctionProtos; their opset equals the model's default-domain opset.

    The SparseMoE body is specialised for the activation and bias inputs of the model's nodes
    (see ``sparse_moe.onnx_function``). Where every node needs the same body there is one
    function ``moetrt::SparseMoE``; where layers differ, each variant becomes an overload of it
    (the node's ``overload`` field, IR version 10; ONNX Runtime resolves overloads, TensorRT's
    parser may not). Returns the number of nodes per op.
    """
    import onnx_ir as ir

    opset = ir_model.opset_imports[""]
    counts = {"TopKRouting": 0, "SparseMoE": 0}
    variants = {}  # key -> the variant, in the order the layers first need them
    experts_nodes = []
    routing_variants, routing_nodes, domain_version = {}, [], DOMAIN_VERSION
    for node in ir_model.graph:
        if node.domain == DOMAIN:
            counts[node.op_type] += 1
            if node.op_type == "TopKRouting":  # version 2: a selection bias and/or groups; 3: norm_min
                routing = topk_routing_variant(node)
                routing_variants.setdefault(routing.key, routing)
                routing_nodes.append((node, routing))
                domain_version = max(domain_version, topk_routing_version(node))
            if node.op_type == "SparseMoE":
                variant = onnx_variant(node)
                variants.setdefault(variant.key, variant)
                experts_nodes.append((node, variant))
    gather_below = None
    for node in ir_model.graph:
        if node.domain == DOMAIN and node.op_type == "SparseMoE":
            w_gate_up = node.inputs[3]  # [E, 2F, D]
            shape, dtype = w_gate_up.shape, w_gate_up.dtype
            if shape is not None and dtype is not None and all(isinstance(d, int) for d in shape):
                expert_bytes = (3 * shape[1] // 2) * shape[2] * dtype.itemsize  # gate, up and down
                gather_below = gather_threshold(num_experts, expert_bytes)
            break
    mixed = len(variants) > 1
    mixed_routing = len(routing_variants) > 1
    protos = [topk_routing_function(opset, r, overload=r.name if mixed_routing else "")
              for r in list(routing_variants.values()) or [None]]  # no TopKRouting node: the version-1 body
    for variant in list(variants.values()) or [BodyVariant()]:  # no SparseMoE node: the version-1 body
        protos.append(sparse_moe_function(
            opset, num_experts, gather_below, activation=variant.activation, gate_up_bias=variant.gate_up_bias,
            down_bias=variant.down_bias, overload=variant.name if mixed else "", weight_input=variant.weight_input))
    if mixed:
        for node, variant in experts_nodes:
            node.overload = variant.name
        ir_model.ir_version = max(ir_model.ir_version, 10)  # overloads of functions need IR version 10
    if mixed_routing:
        for node, routing in routing_nodes:
            node.overload = routing.name
        ir_model.ir_version = max(ir_model.ir_version, 10)
    for proto in protos:
        function = ir.serde.deserialize_function(proto)
        ir_model.functions[function.identifier()] = function
    ir_model.opset_imports[DOMAIN] = domain_version  # 1 unless a node uses a version-2 or -3 option
    return counts


def onnx_from_torch(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    router_outputs: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    overwrite: bool = False,
    check: bool = True,
    progress: bool = True,
    streaming: bool | None = None,
) -> Path:
    """Export ``source`` to the canonical ONNX folder ``out_dir`` and return its path.

    ``source``: a :class:`MoETransformer`, a transformers model of a supported family, a
    checkpoint folder or a preset name. ``dtype``: fp32 | fp16 | bf16 (router math and logits
    stay float32). ``router_outputs`` adds ``router_weights.{i}`` / ``router_indices.{i}`` per MoE
    layer. ``external_data``: weights in ``model.onnx.data`` (default: when over 1 GiB). The
    folder is written atomically: on any failure nothing is left behind.

    ``streaming`` (default: on for a checkpoint folder): trace the model with fake weights and
    write each weight straight from the checkpoint's safetensors into the output, one checkpoint
    tensor at a time, so a model larger than memory exports in memory a small multiple of its
    largest tensor (see :mod:`moetrt.export.streaming`); the result equals the in-memory export's.
    """
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not MIN_OPSET <= opset <= 23:
        raise UnsupportedModelError(f"opset must be in {MIN_OPSET}..23 (the function bodies need opset 19), got {opset}")
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    folder = _checkpoint_folder(source)
    if streaming is None:
        streaming = folder is not None
    if streaming and folder is None:
        raise UnsupportedModelError(
            f"streaming export reads a checkpoint folder (config.json + *.safetensors), got {source!r}; "
            "pass the folder, or streaming=False to export a model in memory"
        )
    torch_dtype = TORCH_DTYPES[dtype]
    stages = STREAMING_STAGES if streaming else [s for s in STAGES if s != "load" or not isinstance(source, MoETransformer)]
    steps = Progress(stages, enabled=progress, title="export")  # a model in memory has no "load" stage
    if streaming:
        from .streaming import bind_sources, fake_model, fold_streamed_transposes

        with steps.stage("read checkpoint index", str(folder)):
            cfg, sources = checkpoint_sources(folder)
        model, source_desc, source_dir = fake_model(cfg, torch_dtype), str(folder.resolve()), folder

        def prepare(ir_model) -> None:  # on the traced graph, before the exporter's optimizer
            bind_sources(ir_model, cfg, sources, torch_dtype)
            fold_streamed_transposes(ir_model)

        weight_bytes = sum(torch.Size(s.shape).numel() for s in sources.values()) * torch_dtype.itemsize
    else:
        model, source_desc, source_dir = _resolve_model(source, steps)
        if not isinstance(model, MoETransformer):
            raise UnsupportedModelError(f"expected a moetrt.MoETransformer, got {type(model).__name__}")
        if model.dtype != torch_dtype:
            model = copy.deepcopy(model).to(torch_dtype)  # the caller's model is left as it was (selection bias: fp32)
        prepare = None
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    if dtype == "bf16" and any(cfg.is_linear_attention_layer(i) for i in range(cfg.num_hidden_layers)):
        why = ("has linear-attention layers, whose causal conv has no bfloat16 ONNX Conv (before opset 22, and in "
               "no ONNX Runtime CPU kernel)")
        raise UnsupportedModelError(f"a bf16 export of this model {why}; pass dtype='fp16' or 'fp32'",
                                    cli=f"--dtype bf16: this model {why}; use --dtype fp16 or fp32")
    model.eval()
    spec = io_spec(cfg, dtype, router_outputs)

    with steps.stage("trace", f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts, {dtype}"):
        dynamic = torch.export.Dim.DYNAMIC
        dynamic_shapes = (
            {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic},
            tuple({0: dynamic} | ({e.concat_axis: dynamic} if e.grows else {})
                  for entries in spec.state.layers for e in entries),  # *past_flat
        )
        ir_model = trace_to_onnx(
            _ExportWrapper(model, router_outputs, spec.state).eval(), _example_inputs(cfg, torch_dtype), dynamic_shapes,
            spec.input_names, spec.output_names, opset, prepare=prepare,
        )
    streamed = _streamed_initializers(ir_model)
    _check_reads(streamed, 0)

    with steps.stage("attach functions"):
        _rename_dims(ir_model, spec)
        counts = attach_functions(ir_model, cfg.num_experts)
        expected = len(cfg.moe_layers)
        if counts != {"TopKRouting": expected, "SparseMoE": expected}:
            raise AssertionError(f"expected {expected} TopKRouting and SparseMoE nodes, the export has {counts}")
        ir_model.producer_name, ir_model.producer_version = "moetrt", package_versions("moetrt").get("moetrt", "")

    use_external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD
    detail = f"{out_dir} ({weight_bytes / 2**30:.2f} GiB of weights{', streamed' if streaming else ''})"
    with steps.stage("save", detail), atomic_output_dir(out_dir, overwrite) as tmp:
        import onnx_ir as ir

        model_path = tmp / "model.onnx"
        written = [0]

        def saved(tensor, info) -> None:  # before each external tensor is written
            steps.update(written[0], weight_bytes, f"{info.index + 1}/{info.total} tensors")
            written[0] += tensor.nbytes

        ir.save(ir_model, model_path, external_data="model.onnx.data" if use_external else None,
                callback=saved if use_external else None)
        if use_external:
            steps.update(weight_bytes, weight_bytes, "written", force=True)
        _check_reads(streamed, 1)
        if streamed:
            from .streaming import warn_nonfinite

            warn_nonfinite(streamed, str(source_desc))
        if check:
            import onnx

            try:
                onnx.checker.check_model(str(model_path), full_check=True)
            except onnx.checker.ValidationError as exc:
                raise AssertionError(f"the exported model fails onnx.checker: {exc}") from exc
        write_artifact(tmp, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "export": {
                "target": "canonical", "dtype": dtype, "opset": ir_model.opset_imports[""],
                "domain": {DOMAIN: ir_model.opset_imports[DOMAIN]}, "router_outputs": router_outputs,
                "external_data": use_external, "nodes": counts,
            },
            "io": spec.to_dict(),
            "dynamic_axes": {"batch": BATCH, "sequence": SEQ, "past": PAST, "total": TOTAL, "tokens": TOKENS},
            "source": source_desc,
            "versions": package_versions(),
        }, tokenizer_from=source_dir, tokenizer_files=TOKENIZER_FILES, genai=True)
    steps.done(f"exported to {out_dir}")
    return out_dir

