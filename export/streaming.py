"""Export a checkpoint folder without holding the model in memory.

The materialised export loads every weight, traces, and lets the exporter's optimizer fold
the weight transposes (``x @ W.T`` -> ``x @ W_t``) into new initializers. Here the model is
traced with fake tensors (shapes and dtypes only), and each initializer is bound to where its
data lies in the checkpoint (:class:`moetrt.checkpoint.ParamSource`):

- small initializers (norm weights, small routers: at most :data:`EAGER_ELEMENTS`, the
  largest input the exporter's constant folder reads) are read at once, so the optimizer folds
  and deduplicates them exactly as it does in the materialised export;
- every other initializer becomes a :class:`StreamedTensor`: nothing is read until the model
  is saved, and then it is written to the external data file piece by piece (one checkpoint
  tensor at a time: one expert's projection of a stacked ``[E, 2F, D]`` tensor, one attention
  matrix), converted to the export dtype on the way.
- the optimizer folds ``Transpose(W)`` of a large ``W`` only when the Transpose is its single
  consumer; :func:`fold_streamed_transposes` does that fold before the optimizer runs, as a
  transposed :class:`StreamedTensor` under the name the optimizer gives it.

So the optimizer never reads a large weight, and peak memory is a small multiple of the
largest checkpoint tensor, whatever the model's size. ``tests/export/test_streaming_export.py``
checks that the graph, every initializer and the ONNX Runtime outputs equal the materialised
export's.
"""

from __future__ import annotations

import warnings

import onnx_ir as ir
import torch

from moetrt.checkpoint import ParamSource
from moetrt.dtypes import from_torch, onnx_elem_type

from moetrt.model import parameter_dtype

__all__ = ["StreamedTensor", "bind_sources", "fold_streamed_transposes", "fake_model", "to_ir_tensor", "EAGER_ELEMENTS"]

# initializers up to this many elements are read at once: onnxscript's constant folder reads
# inputs of at most 8192 elements (DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT) and the initializer
# deduplication at most 1024, so these must hold real data for the graph to come out the same
EAGER_ELEMENTS = 8192
# elements checked for NaN/Inf, or copied into a transposed slab, at a time: torch.isfinite of a
# bf16 tensor makes temporaries ~3.5x its size (abs, two comparisons, their and), so a whole
# 1.2 GB embedding checked at once held ~4 GB; slabs of 2**24 elements bound them to ~100 MB
SLAB_ELEMENTS = 1 << 24


def to_ir_tensor(tensor: torch.Tensor, name: str | None = None) -> ir.Tensor:
    """A torch tensor as an ``onnx_ir`` tensor (bfloat16 through ml_dtypes), sharing memory."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # a dependency of onnx-ir

        array = tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return ir.tensor(array, dtype=ir.DataType.BFLOAT16, name=name)
    return ir.tensor(tensor.numpy(), name=name)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def _ir_dtype(dtype: torch.dtype) -> ir.DataType:
    return ir.DataType(onnx_elem_type(from_torch(dtype)))


class StreamedTensor(ir.LazyTensor):
    """An initializer whose data stays in the checkpoint until it is written.

    ``tofile`` (what ``onnx_ir.save`` calls for external data) writes it piece by piece;
    ``numpy``/``tobytes`` (an inline save, a test) assemble it whole. ``reads`` counts how
    often the checkpoint was read for it, ``nonfinite`` whether a NaN/Inf went by.
    """

    def __init__(self, source: ParamSource, dtype: torch.dtype, perm: tuple[int, ...] | None = None,
                 name: str | None = None):
        shape = source.shape if perm is None else tuple(source.shape[p] for p in perm)
        super().__init__(self._assemble, _ir_dtype(dtype), ir.Shape(shape), name=name)
        self.source, self.torch_dtype, self.perm = source, dtype, perm
        self.reads, self.nonfinite = 0, False

    def transposed(self, perm: tuple[int, ...], name: str | None = None) -> "StreamedTensor":
        assert self.perm is None, "a streamed tensor is transposed at most once"
        return StreamedTensor(self.source, self.torch_dtype, perm, name=name)

    def _check(self, chunk: torch.Tensor) -> torch.Tensor:
        if not self.nonfinite:
            flat = chunk.reshape(-1)
            self.nonfinite = any(not bool(torch.isfinite(flat[start : start + SLAB_ELEMENTS]).all())
                                 for start in range(0, flat.numel(), SLAB_ELEMENTS))
        return chunk

    def _whole(self) -> torch.Tensor:
        self.reads += 1
        tensor = self._check(self.source.read(self.torch_dtype))
        return tensor if self.perm is None else tensor.permute(self.perm).contiguous()

    def _assemble(self):
        return to_ir_tensor(self._whole(), name=self.name)

    def tofile(self, file) -> None:
        if self.perm is not None:  # a transposed matrix needs all of its source at once, not two copies
            self.reads += 1
            whole = self._check(self.source.read(self.torch_dtype)).permute(self.perm)  # a view
            rows = max(1, SLAB_ELEMENTS // max(1, whole[0].numel())) if whole.shape[0] else 1
            for start in range(0, whole.shape[0], rows):  # one slab of output rows copied at a time
                file.write(_bytes_of(whole[start : start + rows]))
            return
        self.reads += 1
        for chunk in self.source.chunks(self.torch_dtype):  # one checkpoint tensor at a time
            file.write(_bytes_of(self._check(chunk)))
            del chunk  # before the next one is read


def fake_model(cfg, dtype: torch.dtype):
    """The model of ``cfg`` in ``dtype`` with fake weights: shapes and dtypes, no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moetrt.model import MoETransformer

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # fake parameters cannot be converted after the fact (Module.to fails on them)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = MoETransformer(cfg)
            # float buffers in dtype too, as Module.to(dtype) leaves them in the materialised export
            for module in model.modules():
                for name, buffer in list(module.named_buffers(recurse=False)):
                    if buffer.is_floating_point():
                        module.register_buffer(name, buffer.to(dtype), persistent=name in module._buffers
                                               and name not in module._non_persistent_buffers_set)
            if cfg.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
            for name, param in list(model.named_parameters()):  # the few kept float32 in every export dtype
                if parameter_dtype(name, dtype) != dtype:
                    module_name, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(
                        torch.zeros(param.shape, dtype=parameter_dtype(name, dtype)), requires_grad=False))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def bind_sources(ir_model: ir.Model, cfg, sources: dict[str, ParamSource], dtype: torch.dtype,
                 prefix: str = "model.") -> list[StreamedTensor]:
    """Give each initializer of a fake-traced model its data (or where its data lies); returns the streamed ones.

    ``sources``: model parameter name -> :class:`ParamSource`; initializers are named
    ``prefix + parameter name``. The rotary ``inv_freq`` buffer is recomputed from the config.
    """
    from moetrt.model import full_rotary_embedding, rotary_embedding

    streamed = []
    for name, value in list(ir_model.graph.initializers.items()):
        param = name[len(prefix):] if name.startswith(prefix) else name
        if param == "lm_head.weight" and cfg.tie_word_embeddings:
            param = "embed_tokens.weight"  # one tensor, which the tracer may name either way
        if param in sources:
            source, want = sources[param], parameter_dtype(param, dtype)
            if value.dtype != _ir_dtype(want) or tuple(value.shape) != tuple(source.shape):
                raise AssertionError(f"traced {name} is {value.dtype} {value.shape}, the checkpoint gives "
                                     f"{want} {source.shape}")
            if torch.Size(source.shape).numel() <= EAGER_ELEMENTS:
                value.const_value = to_ir_tensor(source.read(want), name=name)
            else:
                value.const_value = StreamedTensor(source, want, name=name)
                streamed.append(value.const_value)
        elif param == "rotary.inv_freq":
            inv_freq = rotary_embedding(cfg).inv_freq  # [Hd/2], as the loader rebuilds it
            value.const_value = to_ir_tensor(inv_freq.to(dtype), name=name)
        elif param == "rotary_full.inv_freq":  # full-attention layers' own RoPE (Gemma 4)
            inv_freq = full_rotary_embedding(cfg).inv_freq  # [Hd/2]
            value.const_value = to_ir_tensor(inv_freq.to(dtype), name=name)
        else:
            raise AssertionError(f"the traced model has an initializer {name!r} that is no model parameter")
    return streamed


def fold_streamed_transposes(ir_model: ir.Model) -> int:
    """``Transpose(W)`` of a streamed ``W`` consumed only there -> one transposed streamed initializer.

    The optimizer's rule for large constants (``_DEFAULT_ALWAYS_FOLD_OPS``): a Transpose folds
    whatever its size when it is the single consumer of its input; the folded initializer takes
    the name of the Transpose's output. Returns how many it folded.
    """
    graph, count = ir_model.graph, 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type != "Transpose":
            continue
        (x,) = node.inputs
        tensor = x.const_value
        if not (x.is_initializer() and isinstance(tensor, StreamedTensor) and len(x.consumers()) == 1
                and not x.is_graph_input() and not x.is_graph_output()):
            continue
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(x.shape))))
        out = node.outputs[0]
        name = out.name
        folded = tensor.transposed(perm, name=name)
        value = ir.Value(shape=folded.shape, type=ir.TensorType(folded.dtype), const_value=folded)
        out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.initializers.pop(x.name)
        value.name = name
        graph.register_initializer(value)
        count += 1
    return count


def warn_nonfinite(streamed: list, source: str) -> None:
    bad = [t.name for t in streamed if t.nonfinite]
    if bad:
        warnings.warn(f"{source}: non-finite values (NaN/Inf) in {', '.join(bad[:5])}; outputs will be NaN")
