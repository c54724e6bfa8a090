"""``moetrt::SparseMoE(x, weights, indices, w_gate_up, w_down[, b_gate_up][, b_down]) -> y``: the routed experts.

Semantics (DESIGN.md, domain ``moetrt`` version 1)::

    x          [T, D]        model dtype
    weights    [T, K]        float32, from TopKRouting
    indices    [T, K]        int32,   from TopKRouting
    w_gate_up  [E, 2F, D]    gate rows then up rows (HF transformers v5 layout)
    w_down     [E, D, F]
    b_gate_up  [E, 2F]       optional: gate biases then up biases
    b_down     [E, D]        optional
    gate, up = split(w_gate_up[e] x_t + b_gate_up[e])                     [F] each
    y[t] = sum_j weights[t, j] * (w_down[e] act(gate, up) + b_down[e]),   e = indices[t, j]
    activation "silu" (SwiGLU):   act = silu(gate) * up
    activation "clamped_swiglu" (gpt-oss), attributes alpha (1.702), limit (7.0):
        gate = min(gate, limit); up = clamp(up, -limit, limit)
        act  = (up + 1) * gate * sigmoid(alpha * gate)
    activation "gelu_tanh" (GeGLU, Gemma 4):
        act  = gelu_tanh(gate) * up,  gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
    weight_input 1 (Llama 4): the routing weight scales the expert's input instead of its output,
        y[t] = sum_j (w_down[e] act(gate, up) + b_down[e]) with gate, up from weights[t, j] * x_t
        (the product in float32, cast to the model dtype); without biases and with weight 1 it is
        the default weighting with weight 1

Work is proportional to T*K, not T*E: the (token, slot) pairs are sorted once by expert and
each expert multiplies only the rows routed to it. The routing weight multiplies in float32
and the product is cast back to the model dtype before the sum, as transformers does.

Shared experts are not part of this op; they stay ordinary dense layers beside it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moetrt.ops._spec import Attr, OpSpec, Port

__all__ = ["sparse_moe", "sparse_moe_eager", "sparse_moe_reference", "OP_NAME", "ACTIVATIONS", "SPEC"]

OP_NAME = "SparseMoE"
# silu: SwiGLU, down(silu(gate) * up).
# clamped_swiglu (gpt-oss): gate = min(gate, limit), up = clamp(up, -limit, limit),
#   down((up + 1) * gate * sigmoid(alpha * gate)).
# gelu_tanh (Gemma 4): GeGLU with the tanh approximation of GELU, down(gelu_tanh(gate) * up).
ACTIVATIONS = ("silu", "clamped_swiglu", "gelu_tanh")

SPEC = OpSpec(
    name=OP_NAME, domain="moetrt", version=1, doc=__doc__,
    inputs=(
        Port("x", "T", "tokens [T, D]"),
        Port("weights", "W", "routing weights [T, K], float32"),
        Port("indices", "I", "expert indices [T, K]"),
        Port("w_gate_up", "T", "[E, 2F, D], gate rows then up rows"),
        Port("w_down", "T", "[E, D, F]"),
        Port("b_gate_up", "T", "[E, 2F] bias of the gate and up rows", optional=True),
        Port("b_down", "T", "[E, D] bias of the down projection", optional=True),
    ),
    outputs=(Port("y", "T", "[T, D]"),),
    type_constraints=(
        ("T", ("tensor(float)", "tensor(float16)", "tensor(bfloat16)"), "model dtype"),
        ("W", ("tensor(float)",), "router math is float32"),
        ("I", ("tensor(int32)", "tensor(int64)"), ""),
    ),
    attrs=(
        Attr("activation", str, "silu", ACTIVATIONS, "silu: SwiGLU; clamped_swiglu: gpt-oss's clamped SwiGLU; gelu_tanh: GeGLU (Gemma 4)",
             always=True),
        Attr("alpha", float, 1.702, None, "clamped_swiglu: sigmoid gain", {"activation": ("clamped_swiglu",)}),
        Attr("limit", float, 7.0, None, "clamped_swiglu: clamp of gate (above) and up (both sides)",
             {"activation": ("clamped_swiglu",)}),
        Attr("plugin_namespace", str, "moetrt", ("moetrt",), "makes TensorRT's parser pick the plugin", always=True),
        # only_with itself: it matters, is written on a node and declared by a function body, only when it is 1,
        # so the bodies and nodes that weight the outputs stay as they always were
        Attr("weight_input", int, 0, (0, 1), "1: the routing weight scales the expert's input, not its output (Llama 4)",
             {"weight_input": (1,)}),
    ),
)
# the attributes the torch op takes (plugin_namespace is for TensorRT only)
TORCH_ATTRS = ("activation", "alpha", "limit", "weight_input")


def _check(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, activation, alpha, limit,
           weight_input=0) -> None:
    SPEC.resolve({"activation": activation, "alpha": alpha, "limit": limit, "weight_input": weight_input})
    if x.dim() != 2:
        raise ValueError(f"SparseMoE: x must be [T, D], got shape {tuple(x.shape)}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(
            f"SparseMoE: w_gate_up must be [E, 2F, D] and w_down [E, D, F], got "
            f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}"
        )
    num_tokens, dim = x.shape
    num_experts, two_f, dim_gu = w_gate_up.shape
    if two_f % 2 or dim_gu != dim or tuple(w_down.shape) != (num_experts, dim, two_f // 2):
        raise ValueError(
            f"SparseMoE: weight shapes disagree with x [T={num_tokens}, D={dim}]: w_gate_up "
            f"{tuple(w_gate_up.shape)} (want [E, 2F, {dim}]), w_down {tuple(w_down.shape)} (want [E, {dim}, F])"
        )
    if weights.dim() != 2 or tuple(indices.shape) != tuple(weights.shape) or weights.shape[0] != num_tokens:
        raise ValueError(
            f"SparseMoE: weights and indices must both be [T={num_tokens}, K], got "
            f"{tuple(weights.shape)} and {tuple(indices.shape)}"
        )
    if weights.dtype != torch.float32:
        raise ValueError(f"SparseMoE: routing weights must be float32, got {weights.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"SparseMoE: indices must be int32 or int64, got {indices.dtype}")
    if x.dtype != w_gate_up.dtype or x.dtype != w_down.dtype:
        raise ValueError(
            f"SparseMoE: x, w_gate_up and w_down must share one dtype, got {x.dtype}, "
            f"{w_gate_up.dtype}, {w_down.dtype}"
        )
    for bias, name, want in ((b_gate_up, "b_gate_up", (num_experts, two_f)), (b_down, "b_down", (num_experts, dim))):
        if bias is None:
            continue
        if tuple(bias.shape) != want:
            raise ValueError(f"SparseMoE: {name} must be [{', '.join(map(str, want))}] for these weights, "
                             f"got {tuple(bias.shape)} (or pass None for no bias)")
        if bias.dtype != x.dtype:
            raise ValueError(f"SparseMoE: {name} must have x's dtype {x.dtype}, got {bias.dtype}")


def _activation(gate_up: torch.Tensor, ffn: int, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """[n, 2F] -> [n, F]: the expert's gated activation."""
    if activation == "silu":
        return F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
    if activation == "gelu_tanh":
        return F.gelu(gate_up[:, :ffn], approximate="tanh") * gate_up[:, ffn:]
    gate = gate_up[:, :ffn].clamp(max=limit)
    up = gate_up[:, ffn:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def sparse_moe_eager(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    weight_input: int = 0,
) -> torch.Tensor:
    """The op in plain differentiable PyTorch, tokens grouped by expert."""
    num_tokens, k = indices.shape
    num_experts = w_gate_up.shape[0]
    ffn = w_down.shape[2]
    flat_experts = indices.reshape(-1).long()  # [T*K]
    order = torch.argsort(flat_experts, stable=True)  # [T*K] (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()  # E ints
    flat_weights = weights.reshape(-1)  # [T*K]
    y = torch.zeros_like(x)  # [T, D]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]  # [n] indices into the flattened [T*K]
        start += count
        tokens = pairs // k  # [n]
        rows = x[tokens]  # [n, D]
        if weight_input:  # the weight scales the expert's input (Llama 4), in fp32
            rows = (rows.float() * flat_weights[pairs, None]).to(x.dtype)
        gate_up = F.linear(rows, w_gate_up[expert], None if b_gate_up is None else b_gate_up[expert])  # [n, 2F]
        hidden = _activation(gate_up, ffn, activation, alpha, limit)  # [n, F]
        out = F.linear(hidden, w_down[expert], None if b_down is None else b_down[expert])  # [n, D]
        if not weight_input:
            out = (out.float() * flat_weights[pairs, None]).to(x.dtype)  # weight in fp32, as transformers
        y = y.index_add(0, tokens, out)
    return y


def _sparse_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    weight_input: int = 0,
) -> torch.Tensor:
    """Apply the routed experts to ``x``; only the (token, expert) pairs in ``indices`` are computed."""
    _check(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, activation, alpha, limit, weight_input)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= w_gate_up.shape[0]):
        raise ValueError(
            f"SparseMoE: indices must lie in 0..E-1={w_gate_up.shape[0] - 1}, got "
            f"{int(indices.min())}..{int(indices.max())}"
        )
    return sparse_moe_eager(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, activation, alpha, limit,
                            weight_input)


# The schema comes from SPEC (inputs, attribute kinds and defaults); the Python signatures above
# repeat it for readers and callers, and tests/moetrt/test_ops.py checks that they agree.
sparse_moe = torch.library.custom_op(
    "moetrt::SparseMoE", _sparse_moe, mutates_args=(), schema=SPEC.torch_schema(TORCH_ATTRS, "Tensor")
)


@sparse_moe.register_fake
def _(x, weights, indices, w_gate_up, w_down, b_gate_up=None, b_down=None, activation="silu", alpha=1.702,
      limit=7.0, weight_input=0):
    _check(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, activation, alpha, limit, weight_input)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, activation, alpha, limit, weight_input = inputs
    ctx.save_for_backward(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down)
    ctx.options = (activation, alpha, limit, weight_input)


def _backward(ctx, grad_y):
    x, weights, indices, w_gate_up, w_down, b_gate_up, b_down = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_()
                  for t in (x, weights, w_gate_up, w_down, b_gate_up, b_down)]
        y = sparse_moe_eager(leaves[0], leaves[1], indices, *leaves[2:], *ctx.options)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, present, grad_y, allow_unused=True))
        gx, gw, ggu, gd, gbgu, gbd = (None if t is None else next(grads) for t in leaves)
    return gx, gw, None, ggu, gd, gbgu, gbd, None, None, None, None


sparse_moe.register_autograd(_backward, setup_context=_setup_context)


def sparse_moe_reference(
    x: np.ndarray,
    weights: np.ndarray,
    indices: np.ndarray,
    w_gate_up: np.ndarray,
    w_down: np.ndarray,
    b_gate_up: np.ndarray | None = None,
    b_down: np.ndarray | None = None,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    weight_input: int = 0,
) -> np.ndarray:
    """NumPy float64 reference: a plain loop over (token, slot), returned in x's dtype."""
    SPEC.resolve({"activation": activation, "alpha": alpha, "limit": limit, "weight_input": weight_input})
    out_dtype = np.asarray(x).dtype
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    w_gate_up, w_down = np.asarray(w_gate_up, np.float64), np.asarray(w_down, np.float64)
    num_experts, two_f, _ = w_gate_up.shape
    ffn = w_down.shape[2]
    b_gate_up = np.zeros((num_experts, two_f)) if b_gate_up is None else np.asarray(b_gate_up, np.float64)
    b_down = np.zeros((num_experts, w_down.shape[1])) if b_down is None else np.asarray(b_down, np.float64)
    y = np.zeros_like(x)
    for t in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            w_in, w_out = (weights[t, j], 1.0) if weight_input else (1.0, weights[t, j])
            gate_up = w_gate_up[e] @ (w_in * x[t]) + b_gate_up[e]
            gate, up = gate_up[:ffn], gate_up[ffn:]
            if activation == "silu":
                hidden = gate / (1.0 + np.exp(-gate)) * up
            elif activation == "gelu_tanh":
                hidden = 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate**3))) * up
            else:
                gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
                hidden = (up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))
            y[t] += w_out * (w_down[e] @ hidden + b_down[e])
    return y.astype(out_dtype)


# --- ONNX face ---------------------------------------------------------------------------------
def onnx_schema():
    """The ``OpSchema`` of ``moetrt::SparseMoE`` (version 1), registered only while exporting."""
    return SPEC.onnx_schema()


class BodyVariant:
    """What a function body is specialised for: the activation and which biases the node passes.

    The body never compares the string attribute (TensorRT's parser rejects string Constants):
    each variant gets its own body; alpha and limit stay float attribute references.
    """

    def __init__(self, activation: str = "silu", gate_up_bias: bool = False, down_bias: bool = False,
                 weight_input: int = 0):
        self.activation = SPEC.attr("activation").coerce(activation, OP_NAME)
        self.gate_up_bias, self.down_bias = bool(gate_up_bias), bool(down_bias)
        self.weight_input = SPEC.attr("weight_input").coerce(weight_input, OP_NAME)

    @property
    def key(self) -> tuple[str, bool, bool, int]:
        return self.activation, self.gate_up_bias, self.down_bias, self.weight_input

    @property
    def name(self) -> str:
        """``""`` for the version-1 body (silu, no biases), else e.g. ``clamped_swiglu+b_gate_up+b_down``."""
        parts = [self.activation] + ["b_gate_up"] * self.gate_up_bias + ["b_down"] * self.down_bias
        parts += ["weight_input"] * self.weight_input
        return "" if parts == ["silu"] else "+".join(parts)

    @property
    def inputs(self) -> list[str]:
        """The function's formal inputs: up to the last bias it reads."""
        last = "b_down" if self.down_bias else "b_gate_up" if self.gate_up_bias else "w_down"
        names = SPEC.input_names
        return names[: names.index(last) + 1]


def onnx_variant(node) -> BodyVariant:
    """The body variant an onnx-ir ``SparseMoE`` node needs (its activation and bias inputs)."""
    attrs = SPEC.read_ir_attributes(node)
    inputs = list(node.inputs)

    def present(name: str) -> bool:
        i = SPEC.input_index(name)
        return i < len(inputs) and inputs[i] is not None

    return BodyVariant(attrs["activation"], present("b_gate_up"), present("b_down"), attrs["weight_input"])


class _Act:
    """The clamped activation's scalars in the model dtype, made once in the function body."""

    def __init__(self, b):
        self.alpha = b.op("CastLike", b.attr_const("alpha", "float"), "x")
        self.limit = b.op("CastLike", b.attr_const("limit", "float"), "x")
        self.neg_limit = b.op("Neg", self.limit)
        self.one = b.op("CastLike", b.const(1.0, dtype=np.float32), "x")


class _Gelu:
    """The tanh GELU's constants in the model dtype, made once in the function body."""

    def __init__(self, b):
        def const(value):
            return b.op("CastLike", b.const(value, dtype=np.float32), "x")

        self.half, self.one = const(0.5), const(1.0)
        self.root, self.cubic = const(float(np.sqrt(2.0 / np.pi))), const(0.044715)


def _activation_onnx(b, gate, up, act: _Act | _Gelu | None):
    """[n, F] x2 -> [n, F]: silu(gate) * up, gelu_tanh(gate) * up (``act`` a :class:`_Gelu`), or the clamped
    SwiGLU when ``act`` holds its scalars. GELU is spelled out (no string attribute, any opset, TensorRT's parser)."""
    if act is None:
        return b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    if isinstance(act, _Gelu):
        cube = b.op("Mul", b.op("Mul", gate, gate), gate)  # [n, F]
        inner = b.op("Mul", act.root, b.op("Add", gate, b.op("Mul", act.cubic, cube)))
        gelu = b.op("Mul", b.op("Mul", act.half, gate), b.op("Add", act.one, b.op("Tanh", inner)))
        return b.op("Mul", gelu, up)
    gate = b.op("Min", gate, act.limit)  # [n, F]
    up = b.op("Clip", up, act.neg_limit, act.limit)  # [n, F]
    glu = b.op("Mul", gate, b.op("Sigmoid", b.op("Mul", gate, act.alpha)))
    return b.op("Mul", b.op("Add", up, act.one), glu)


def _expert_mlp(b, x, w_gu_t, w_down_t, b_gu=None, b_d=None, act=None):
    """The expert's MLP on rows ``x`` [n, D] through its (transposed) weights and biases: [n, D]."""
    gate_up = b.op("MatMul", x, w_gu_t)  # [n, 2F]
    if b_gu is not None:
        gate_up = b.op("Add", gate_up, b_gu)
    gate, up = b.op("Split", gate_up, axis=1, num_outputs=2, outputs=2)  # [n, F] x2
    hidden = _activation_onnx(b, gate, up, act)  # [n, F]
    out = b.op("MatMul", hidden, w_down_t)  # [n, D]
    return out if b_d is None else b.op("Add", out, b_d)


def _weighted(b, rows, weights):
    """``rows [n, D]`` times ``weights [n]`` in float32, cast back to the model dtype."""
    from moetrt.ops._onnx import FLOAT

    weighted = b.op("Mul", b.op("Cast", rows, to=FLOAT), b.op("Unsqueeze", weights, b.const([1])))  # [n, D]
    return b.op("CastLike", weighted, "x")


def _weighted_sum(b, pairs, flat_w, pair_shape):
    """sum_j weights[t, j] * pairs[t*K + j]: weight in float32, cast back to the model dtype, then summed.
    ``flat_w`` None: the pairs are summed as they are (the weights scaled the experts' inputs)."""
    weighted = pairs if flat_w is None else _weighted(b, pairs, flat_w)  # [N, D]
    return b.op("ReduceSum", b.op("Reshape", weighted, pair_shape), b.const([1]), keepdims=0)  # [T, D]


# One expert slice of the prefill path costs a few node launches (~30 us on a CPU); copying an
# expert's weights costs its bytes at ~10 GB/s. Gathering N experts beats running all E slices
# while N * expert_bytes < E * this many bytes.
GATHER_BYTES_PER_EXPERT_SLICE = 256 * 1024


def gather_threshold(num_experts: int, expert_bytes: int) -> int:
    """Pairs (T*K) below which the decode path gathers the routed experts' weights.

    Small experts (d 256, ffn 512: 1.5 MB in fp32) gather for single-token steps of many-expert
    models; large ones (Mixtral: 352 MB in bf16) never do: copying them costs more than the
    per-expert slices, which read the weights in place.
    """
    return (num_experts * GATHER_BYTES_PER_EXPERT_SLICE) // max(expert_bytes, 1)


def onnx_function(opset: int, num_experts: int, gather_below: int | None = None, *, activation: str = "silu",
                  gate_up_bias: bool = False, down_bias: bool = False, overload: str = "", weight_input: int = 0):
    """The model-local ``FunctionProto`` for models with ``num_experts`` experts.

    Work grows with T*K, not T*E. Two paths, chosen at run time by N = T*K (without an If: the
    path not taken gets zero pairs, so TensorRT's compiler, which cannot build data-dependent
    shapes inside an If branch, builds the body too):

    - N < ``gather_below`` (decode steps of models with small experts; default E, see
      :func:`gather_threshold`): gather only the routed experts' weights, one batched MatMul
      per projection over the N (token, slot) pairs; with ``gather_below <= 1`` this path is
      left out;
    - otherwise: count the pairs per expert (CumSum offsets), sort them once by expert
      (a stable counting sort: each pair's row is its expert's offset plus the number of
      earlier pairs of that expert; ScatterElements without reduction inverts it) and run
      each expert on its Slice of rows. The per-expert
      weight slices come from Gather/Transpose of the weight inputs with constant indices,
      which runtimes fold into initializers at load time.
    Pairs return to (token, slot) order by a Gather of their rows, and the K slots of a token
    are summed: no scatter with a reduction, so TensorRT's parser accepts the body too.

    The body is specialised for one ``activation`` and the bias inputs the node passes
    (``gate_up_bias``, ``down_bias``) and where the routing weight multiplies (``weight_input``: the
    rows going into the experts, else their outputs); alpha and limit are read from the node's attributes.
    ``overload`` names the function's overload where one model needs several variants.
    """
    from moetrt.ops._onnx import INT64, Body, make_function

    variant = BodyVariant(activation, gate_up_bias, down_bias, weight_input)
    E = num_experts
    gather_below = E if gather_below is None else gather_below
    b = Body("smoe_")
    flat_e = b.op("Reshape", b.op("Cast", "indices", to=INT64), b.const([-1]))  # [N]
    flat_w = b.op("Reshape", "weights", b.const([-1]))  # [N]
    n_1d = b.op("Shape", flat_e)  # [1]
    k_1d = b.op("Shape", "indices", start=1, end=2)  # [1]
    d_1d = b.op("Shape", "x", start=1, end=2)  # [1]
    pair_shape = b.op("Concat", b.const([-1]), k_1d, d_1d, axis=0)  # [-1, K, D]
    token_of_pair = b.op("Div", b.op("Range", b.const(0), b.op("Squeeze", n_1d), b.const(1)), b.op("Squeeze", k_1d))

    # per-expert weights, transposed for MatMul, and biases; constant indices let runtimes fold them
    w_gu_t, w_down_t = [], []
    for e in range(E):
        w_gu_t.append(b.op("Transpose", b.op("Gather", "w_gate_up", b.const(e), axis=0), perm=[1, 0]))  # [D, 2F]
        w_down_t.append(b.op("Transpose", b.op("Gather", "w_down", b.const(e), axis=0), perm=[1, 0]))  # [F, D]
    b_gu = [b.op("Gather", "b_gate_up", b.const(e), axis=0) if gate_up_bias else None for e in range(E)]  # [2F]
    b_d = [b.op("Gather", "b_down", b.const(e), axis=0) if down_bias else None for e in range(E)]  # [D]
    act = {"clamped_swiglu": _Act, "gelu_tanh": _Gelu}.get(variant.activation, lambda _: None)(b)

    # The pairs split in two: the first n_g go through the gather path, the other N - n_g through the
    # sorted path; n_g = N for decode-sized steps (N < gather_below), else 0. No If: TensorRT cannot
    # build an If branch holding the sorted path's data-dependent Slices (its Myelin compiler fails
    # or crashes), and an empty path costs a few empty ops.
    if gather_below > 1:
        decode = b.op("Less", n_1d, b.const([gather_below]))  # [1]
        n_g = b.op("Where", decode, n_1d, b.const([0]))  # [1]
        zero, big = b.const([0]), b.const([2**62])
        g_e, g_tok = b.op("Slice", flat_e, zero, n_g), b.op("Slice", token_of_pair, zero, n_g)  # [n_g] x2
        g_w = b.op("Slice", flat_w, zero, n_g) if weight_input else None  # [n_g]
        s_e, s_first = b.op("Slice", flat_e, n_g, big), n_g  # [N - n_g], [1]
    else:  # the experts are too large to copy: every step slices them in place
        s_e, s_first = flat_e, None

    outs = []
    if gather_below > 1:  # decode path: gather the routed experts' weights
        x_pairs = b.op("Gather", "x", g_tok, axis=0)  # [n_g, D]
        if weight_input:
            x_pairs = _weighted(b, x_pairs, g_w)  # [n_g, D]
        x_pairs = b.op("Unsqueeze", x_pairs, b.const([2]))  # [n_g, D, 1]
        gate_up = b.op("MatMul", b.op("Gather", "w_gate_up", g_e, axis=0), x_pairs)  # [n_g, 2F, 1]
        gate_up = b.op("Squeeze", gate_up, b.const([2]))  # [n_g, 2F]
        if gate_up_bias:
            gate_up = b.op("Add", gate_up, b.op("Gather", "b_gate_up", g_e, axis=0))  # [n_g, 2F]
        gate, up = b.op("Split", gate_up, axis=1, num_outputs=2, outputs=2)  # [n_g, F]
        hidden = b.op("Unsqueeze", _activation_onnx(b, gate, up, act), b.const([2]))  # [n_g, F, 1]
        out = b.op("Squeeze", b.op("MatMul", b.op("Gather", "w_down", g_e, axis=0), hidden), b.const([2]))  # [n_g, D]
        if down_bias:
            out = b.op("Add", out, b.op("Gather", "b_down", g_e, axis=0))  # [n_g, D]
        outs.append(out)

    # prefill path: sort its pairs by expert (a stable counting sort: no TopK, whose K TensorRT caps
    # at 3840), a Slice of rows per expert
    m_range = b.op("Range", b.const(0), b.op("Squeeze", b.op("Shape", s_e)), b.const(1))  # [M]
    one_hot = b.op("Cast", b.op("Equal", b.op("Unsqueeze", s_e, b.const([1])), b.const([list(range(E))])),
                   to=INT64)  # [M, E]
    counts = b.op("ReduceSum", one_hot, b.const([0]), keepdims=0)  # [E]
    ends = b.op("CumSum", counts, b.const(0))  # [E]
    starts = b.op("Sub", ends, counts)  # [E]
    earlier = b.op("CumSum", one_hot, b.const(0), exclusive=1)  # [M, E] pairs before this one, per expert
    rank = b.op("Squeeze", b.op("GatherElements", earlier, b.op("Unsqueeze", s_e, b.const([1])), axis=1),
                b.const([1]))  # [M] among its expert's pairs
    slot = b.op("Add", b.op("Gather", starts, s_e, axis=0), rank)  # [M] each pair's row in expert order
    order = b.op("ScatterElements", b.op("Mul", m_range, b.const(0)), slot, m_range, axis=0)  # [M] row -> pair
    pair = order if s_first is None else b.op("Add", order, s_first)  # [M] the pairs' indices among all N
    x_sorted = b.op("Gather", "x", b.op("Div", pair, b.op("Squeeze", k_1d)), axis=0)  # [M, D]
    if weight_input:
        x_sorted = _weighted(b, x_sorted, b.op("Gather", flat_w, pair, axis=0))  # [M, D]
    lo = b.op("Split", starts, axis=0, num_outputs=E, outputs=E) if E > 1 else [starts]  # E x [1]
    hi = b.op("Split", ends, axis=0, num_outputs=E, outputs=E) if E > 1 else [ends]  # E x [1]
    expert_outs = []
    for e in range(E):
        rows = b.op("Slice", x_sorted, lo[e], hi[e], b.const([0]))  # [n_e, D]
        expert_outs.append(_expert_mlp(b, rows, w_gu_t[e], w_down_t[e], b_gu[e], b_d[e], act))  # [n_e, D]
    sorted_out = b.op("Concat", *expert_outs, axis=0) if E > 1 else expert_outs[0]  # [M, D] in expert order
    outs.append(b.op("Gather", sorted_out, slot, axis=0))  # [M, D] in (token, slot) order
    pairs = b.op("Concat", *outs, axis=0) if len(outs) > 1 else outs[0]  # [N, D] in (token, slot) order
    y = _weighted_sum(b, pairs, None if weight_input else flat_w, pair_shape)  # [T, D]
    b.rename_output(y, "y")
    doc = f"moetrt::SparseMoE in standard ONNX ops, for {E} experts"
    if variant.name:
        doc += f" ({variant.name})"
    return make_function(
        OP_NAME, b, variant.inputs, ["y"], opset,
        attribute_defaults=SPEC.defaults_for({"activation": variant.activation, "weight_input": variant.weight_input}),
        doc=doc, overload=overload,
    )
