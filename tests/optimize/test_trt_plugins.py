"""The TensorRT plugins without TensorRT: their kernels, their launch ABI, their definitions.

- every AOT plugin kernel compiles to PTX for sm_90 here (no GPU), with exactly the parameters
  TensorRT passes (inputs, extra int32 scalars, outputs) and at most 48 KiB of shared memory;
- the five kernels, launched in Triton's interpreter exactly as an engine would launch them
  (TensorRT's argument order, output sizes and grids from the formulas the plugins declare),
  compute TopKRouting and SparseMoE as the NumPy references do;
- the ``tensorrt.plugin`` definitions (read as source, since tensorrt cannot import here) declare
  the attributes the ONNX nodes carry, in the order the AOT path passes them;
- nothing imports tensorrt, triton or polygraphy on import, and a missing TensorRT is a clear error.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from moetrt.errors import BackendMissingError
from moetrt.ops.plugins import (AOT_PLUGINS, BIAS_FLAGS, JIT_PLUGINS, PLUGIN_ATTRIBUTES, SPARSE_MOE_NOT_IN_PLUGINS,
                                register_plugins)
from moetrt.ops.plugins.aot import (
    INT_OPS,
    SPARSE_MOE_PLUGINS,
    attribute_text,
    max_blocks,
    moe_gate_up_aot_kernel,
    sparse_moe_attributes,
    sparse_moe_plan,
    strip_unused_params,
    topk_routing_aot_kernel,
)
from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE_SPEC

TRT_DEFINITIONS = Path(__file__).resolve().parents[2] / "moetrt" / "ops" / "plugins" / "_trt.py"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install moetrt[gpu])")

GPT_OSS = {"activation": "clamped_swiglu", "alpha": 1.702, "limit": 1.5}  # a limit these unit-scale inputs cross
# (T, E, k, D, F, dtype, scoring, normalize, scale, num_tokens the plan is made for, SparseMoE attributes, biases)
INTERPRETER_CASES = [
    (1, 4, 2, 32, 24, "fp32", "softmax", True, 1.0, 1, {}, []),
    (5, 8, 2, 40, 48, "fp16", "softmax", False, 1.0, 1, {}, []),
    (33, 3, 1, 16, 16, "fp32", "sigmoid", False, 2.5, 4096, {}, []),  # 128-row blocks, most of them padding
    (7, 2, 2, 24, 40, "fp32", "softmax", True, 1.0, 64, {}, []),  # k = E
    (6, 8, 4, 40, 24, "fp32", "softmax", True, 1.0, 1, GPT_OSS, ["b_gate_up", "b_down"]),  # gpt-oss's experts
    (9, 4, 2, 24, 40, "fp16", "softmax", True, 1.0, 1, GPT_OSS, ["b_down"]),
    (33, 3, 2, 16, 24, "fp32", "softmax", True, 1.0, 4096, GPT_OSS, ["b_gate_up"]),  # prefill plan
    (5, 4, 2, 32, 16, "fp32", "softmax", False, 1.0, 1, {}, ["b_gate_up", "b_down"]),  # SwiGLU with biases
]
# (name, plan arguments): a small model, Mixtral-8x7B's experts at a decode and a prefill plan, gpt-oss-20b's
COMPILE_PLANS = {
    "small_fp16": ("fp16", dict(hidden_size=128, ffn=192, num_experts=8, k=2, num_tokens=8)),
    "mixtral_decode": ("bf16", dict(hidden_size=4096, ffn=14336, num_experts=8, k=2, num_tokens=1)),
    "mixtral_prefill": ("bf16", dict(hidden_size=4096, ffn=14336, num_experts=8, k=2, num_tokens=4096)),
    "gpt_oss_decode": ("bf16", dict(hidden_size=2880, ffn=2880, num_experts=32, k=4, num_tokens=1, attributes=GPT_OSS,
                                    biases=["b_gate_up", "b_down"])),
    "gpt_oss_prefill": ("bf16", dict(hidden_size=2880, ffn=2880, num_experts=32, k=4, num_tokens=4096,
                                     attributes=GPT_OSS, biases=["b_gate_up", "b_down"])),
}


def _run(script: str, *args: str, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- PTX for sm_90 -----------------------------------------------------------------------------
_COMPILE = """
import json, re, sys
from moetrt.ops.plugins import aot
plans = json.loads(sys.argv[1])
out = {}
kernels = {"router_e8": aot.topk_routing_aot_kernel(8, 2, "softmax", True, 1.0),
           "router_e256": aot.topk_routing_aot_kernel(256, 8, "sigmoid", True, 2.5)}
for name, (dtype, args) in plans.items():
    plan = aot.sparse_moe_plan(**args, element_size=4 if dtype == "fp32" else 2)
    for plugin in aot.SPARSE_MOE_PLUGINS:
        kernels[f"{name}/{plugin}"] = aot.aot_kernel(plugin, dtype, **plan[plugin])
for key, kernel in kernels.items():
    c = aot.compile_aot_kernel(kernel)
    out[key] = {"plugin": kernel.plugin, "entry": c.entry, "ptx": c.ptx, "num_params": c.num_params, "shared": c.shared,
                "block": c.block, "target": c.target, "params": [*kernel.inputs, *kernel.extras, *kernel.outputs],
                "stages": [kernel.spec.num_stages, c.meta["num_stages"]], "constants": c.meta["constants"]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return _run(_COMPILE, json.dumps(COMPILE_PLANS), interpret=False)


@needs_triton
def test_every_plugin_kernel_compiles_for_sm90_with_tensorrts_abi(compiled):
    assert len(compiled) == 2 + 4 * len(COMPILE_PLANS)
    for key, k in compiled.items():
        ptx = k["ptx"]
        assert k["target"] == "sm_90" and re.search(r"^\.target sm_90a?\s*$", ptx, re.M), key
        entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
        assert entry and entry.group(1) == k["entry"], key
        params = re.findall(r"\.param\s+[^,]*?(\w+_param_(\d+))", entry.group(2))
        # exactly inputs + extras + outputs: Triton's hidden scratch pointers are gone
        assert [int(i) for _, i in params] == list(range(len(k["params"]))), (key, params, k["params"])
        pointers = [p for p in k["params"] if p.endswith("_ptr")]
        assert entry.group(2).count(".u64") == len(pointers) and entry.group(2).count(".u32") == len(k["params"]) - len(pointers)
        assert f"{k['entry']}_param_{len(k['params'])}" not in ptx
        assert re.search(rf"\.reqntid {k['block']}\b", ptx), key  # TensorRT's block_x must be this
        assert 0 <= k["shared"] <= 48 * 1024, key


@needs_triton
def test_bias_inputs_are_read_only_by_the_variants_that_have_them(compiled):
    """MoEGateUp / MoEDown always take the bias pointer (parameter 2, where TensorRT puts it); the SwiGLU plans
    without biases never load it, gpt-oss's do, and its alpha and limit are compiled in."""
    for key, k in compiled.items():
        if k["plugin"] not in ("MoEGateUp", "MoEDown"):
            continue
        assert k["params"][2] == "b_ptr", key
        loaded = re.search(rf"ld\.param\.\w+\s+%\w+, \[{k['entry']}_param_2\]", k["ptx"]) is not None
        assert loaded == key.startswith("gpt_oss"), key
        if k["plugin"] == "MoEGateUp":
            clamped = k["constants"]["ACTIVATION"] == "clamped_swiglu"
            assert clamped == key.startswith("gpt_oss"), key
            assert (k["constants"]["ALPHA"], k["constants"]["LIMIT"]) == ((1.702, 1.5) if clamped else (None, None))


@needs_triton
def test_prefill_plans_shrink_to_the_shared_memory_an_aot_plugin_may_use(compiled):
    stages = {key: k["stages"] for key, k in compiled.items() if key.startswith("mixtral_prefill/MoE") and "Gate" in key}
    requested, used = next(iter(stages.values()))
    assert used <= requested


def test_strip_unused_params_refuses_used_ones():
    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_2\n)\n{\n\tld.param.b64 %rd1, [k_param_0];\n}\n")
    stripped = strip_unused_params(ptx, "k", 1)
    assert "k_param_1" not in stripped and "k_param_0" in stripped and stripped.endswith("}\n")
    with pytest.raises(ValueError, match="hidden Triton parameters"):
        strip_unused_params(ptx.replace("[k_param_0]", "[k_param_2]"), "k", 2)
    with pytest.raises(ValueError, match="fewer than"):
        strip_unused_params(ptx, "k", 4)


# --- the kernels, launched as an engine launches them ------------------------------------------
_SIMULATE = """
import json, sys
import numpy as np, torch
from moetrt.ops import sparse_moe_reference, topk_routing_reference
from moetrt.ops.kernels.sparse_moe_triton import max_aligned_blocks
from moetrt.ops.plugins import aot, aot_kernels as K

def launch(kernel, fn, tokens, *args):
    # what TensorRT does: the grid from the plugin's formula, the arguments in the kernel's order
    fn[aot.launch_grid(kernel, tokens)](*args, **kernel.spec.constants)

out = []
for T, E, k, D, F, dtype, scoring, normalize, scale, hint, attrs, biases in json.loads(sys.argv[1]):
    torch.manual_seed(T * 31 + E)
    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    logits = torch.randn(T, E)
    router = aot.topk_routing_aot_kernel(E, k, scoring, normalize, scale)
    weights, indices = torch.full((T, k), -1.0), torch.full((T, k), -1, dtype=torch.int32)
    launch(router, K.topk_routing_aot, T, logits, T, weights, indices)  # inputs, extras, outputs
    ref_w, ref_i = topk_routing_reference(logits.numpy(), k, scoring, normalize, scale)

    x = (torch.randn(T, D) * 0.5).to(dt)
    w_gate_up, w_down = (torch.randn(E, 2 * F, D) * 0.2).to(dt), (torch.randn(E, D, F) * 0.2).to(dt)
    b_gate_up, b_down = torch.randn(E, 2 * F).to(dt), torch.randn(E, D).to(dt)
    plan = aot.sparse_moe_plan(D, F, E, k, hint, element_size=x.element_size(), attributes=attrs, biases=biases)
    # an absent bias is the one-element placeholder the graph rewrite feeds (NaN here: it must not be read)
    b_gate_up_in = b_gate_up if "b_gate_up" in biases else torch.full((1,), float("nan"), dtype=dt)
    b_down_in = b_down if "b_down" in biases else torch.full((1,), float("nan"), dtype=dt)
    kern = {p: aot.aot_kernel(p, dtype, **plan[p]) for p in aot.SPARSE_MOE_PLUGINS}
    bm, pairs = plan["MoEAlign"]["block_m"], T * k
    blocks = aot.max_blocks(pairs, E, bm)  # the sizes moe_align_desc declares
    sorted_ids = torch.full((blocks * bm,), -7, dtype=torch.int32)
    expert_ids, num_padded = torch.full((blocks,), -7, dtype=torch.int32), torch.full((1,), -7, dtype=torch.int32)
    launch(kern["MoEAlign"], K.moe_align_aot, T, indices, pairs, sorted_ids, expert_ids, num_padded)
    h = torch.full((pairs, F), float("nan"), dtype=dt)
    launch(kern["MoEGateUp"], K.moe_gate_up_aot, T, x, w_gate_up, b_gate_up_in, sorted_ids, expert_ids, num_padded,
           pairs, h)
    slots = torch.full((pairs, D), float("nan"), dtype=dt)
    launch(kern["MoEDown"], K.moe_down_aot, T, h, w_down, b_down_in, weights, sorted_ids, expert_ids, num_padded, pairs,
           slots)
    y = torch.full((T, D), float("nan"), dtype=dt)
    launch(kern["MoECombine"], K.moe_combine_aot, T, slots, indices, y)
    ref_y = sparse_moe_reference(x.float().numpy(), ref_w, ref_i, w_gate_up.float().numpy(), w_down.float().numpy(),
                                 b_gate_up.float().numpy() if "b_gate_up" in biases else None,
                                 b_down.float().numpy() if "b_down" in biases else None, **attrs)
    out.append({
        "indices_equal": bool(np.array_equal(indices.numpy(), ref_i)),
        "weights_err": float(np.abs(weights.numpy() - ref_w).max()),
        "y_err": float(np.abs(y.float().numpy() - ref_y).max()), "y_scale": float(np.abs(ref_y).max()),
        "blocks": blocks, "blocks_kernel": max_aligned_blocks(pairs, E, bm), "num_padded": int(num_padded[0]),
        "block_m": bm, "finite": bool(torch.isfinite(y).all()),
    })
print(json.dumps(out))
"""


@needs_triton
def test_plugin_kernels_in_tensorrts_launch_order_compute_the_ops():
    results = _run(_SIMULATE, json.dumps(INTERPRETER_CASES), interpret=True)
    for case, r in zip(INTERPRETER_CASES, results):
        dtype = case[5]
        assert r["indices_equal"], case
        assert r["weights_err"] < 1e-6, (case, r)
        assert r["blocks"] == r["blocks_kernel"], (case, r)  # the declared output size is the kernels' own
        assert 0 < r["num_padded"] <= r["blocks"] * r["block_m"]
        # NOTE: fp16 stores h and the per-slot outputs in fp16 (as the torch path does): ~1e-3 relative
        tol = 1e-4 if dtype == "fp32" else 5e-3
        assert r["finite"] and r["y_err"] <= tol * max(1.0, r["y_scale"]), (case, r)
    assert results[2]["block_m"] == 128 and results[0]["block_m"] == 16


@pytest.mark.parametrize("tokens", [1, 2, 3, 17, 100, 4096])
@pytest.mark.parametrize("experts,k,block_m", [(8, 2, 16), (3, 1, 128), (60, 4, 64), (2, 2, 32)])
def test_max_blocks_bounds_the_alignment(tokens, experts, k, block_m):
    """Worst case: every expert hit wastes block_m - 1 slots; never fewer blocks than pairs need."""
    pairs = tokens * k
    blocks = max_blocks(pairs, experts, block_m, INT_OPS)
    hit = min(experts, pairs)
    assert blocks * block_m >= pairs + hit * (block_m - 1) > (blocks - 1) * block_m


def test_string_attributes_lose_the_parsers_terminator():
    """TensorRT's ONNX parser hands STRING attributes over with a trailing NUL."""
    assert attribute_text("softmax\x00") == attribute_text(b"softmax\x00") == attribute_text("softmax") == "softmax"
    kernel = topk_routing_aot_kernel(8, 2, "sigmoid\x00", True, 1.0)
    assert kernel.spec.constants["SIGMOID"] is True
    with pytest.raises(ValueError, match="scoring must be softmax or sigmoid"):
        topk_routing_aot_kernel(8, 2, "relu", True, 1.0)


def test_plan_attributes_are_the_plugins():
    types_ = _schema_types()
    plan = sparse_moe_plan(hidden_size=4096, ffn=14336, num_experts=8, k=2, num_tokens=4096)
    assert list(plan) == list(SPARSE_MOE_PLUGINS)
    for plugin, attrs in plan.items():
        assert list(attrs) == list(PLUGIN_ATTRIBUTES[plugin])
        assert all(type(v).__name__ == types_[(plugin, n)] for n, v in attrs.items()), (plugin, attrs)
    assert plan["MoEAlign"]["block_m"] == plan["MoEGateUp"]["block_m"] == plan["MoEDown"]["block_m"] == 128
    defaults = SPARSE_MOE_SPEC.defaults
    assert [plan["MoEGateUp"][a] for a in ("activation", "alpha", "limit")] == [defaults[a] for a in
                                                                                 ("activation", "alpha", "limit")]
    assert plan["MoEGateUp"]["has_b_gate_up"] == plan["MoEDown"]["has_b_down"] == 0
    gpt_oss = sparse_moe_plan(2880, 2880, 32, 4, 1, attributes={"activation": "clamped_swiglu\x00", "limit": 7.0,
                                                                 "plugin_namespace": "moetrt", "aot": 1},
                              biases=["b_down"])
    assert gpt_oss["MoEGateUp"]["activation"] == "clamped_swiglu" and gpt_oss["MoEGateUp"]["alpha"] == defaults["alpha"]
    assert (gpt_oss["MoEGateUp"]["has_b_gate_up"], gpt_oss["MoEDown"]["has_b_down"]) == (0, 1)


def test_plugin_attributes_come_from_the_op_spec():
    # Llama 4's input weighting is no plugin attribute: prepare_for_tensorrt refuses such nodes by name
    assert SPARSE_MOE_NOT_IN_PLUGINS == ("weight_input",)
    spec_attrs = tuple(a.name for a in SPARSE_MOE_SPEC.attrs if a.name not in ("plugin_namespace", "weight_input"))
    optional = [p.name for p in SPARSE_MOE_SPEC.inputs if p.optional]
    assert optional == list(BIAS_FLAGS) == ["b_gate_up", "b_down"]
    assert PLUGIN_ATTRIBUTES["SparseMoE"] == (*spec_attrs, "has_b_gate_up", "has_b_down")
    assert PLUGIN_ATTRIBUTES["MoEGateUp"][-4:] == (*spec_attrs, "has_b_gate_up")
    assert PLUGIN_ATTRIBUTES["MoEDown"][-1] == "has_b_down" and "activation" not in PLUGIN_ATTRIBUTES["MoEDown"]
    assert sparse_moe_attributes({"activation": "silu"}) == {"activation": "silu", "alpha": 1.702, "limit": 7.0,
                                                              "has_b_gate_up": 0, "has_b_down": 0}
    with pytest.raises(ValueError, match="activation"):
        sparse_moe_attributes({"activation": "gelu"})
    with pytest.raises(ValueError, match="no optional input"):
        sparse_moe_attributes({}, ["b_up"])
    with pytest.raises(ValueError, match="activation"):
        moe_gate_up_aot_kernel("bf16", 8, 64, 64, 2, 16, 32, 32, activation="relu")
    # silu compiles one kernel whatever alpha and limit say; the clamped one compiles them in
    silu = [moe_gate_up_aot_kernel("bf16", 8, 64, 64, 2, 16, 32, 32, activation="silu", alpha=a) for a in (1.0, 2.0)]
    assert silu[0].key() == silu[1].key()
    clamped = moe_gate_up_aot_kernel("bf16", 8, 64, 64, 2, 16, 32, 32, activation="clamped_swiglu", limit=3.0)
    assert (clamped.spec.constants["ALPHA"], clamped.spec.constants["LIMIT"]) == (1.702, 3.0)


# --- the tensorrt.plugin definitions, read as source -------------------------------------------
def _definitions() -> dict[tuple[str, str], ast.FunctionDef]:
    tree = ast.parse(TRT_DEFINITIONS.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.args:
                    out[(deco.func.attr, deco.args[0].value)] = node
    return out


def _params(fn: ast.FunctionDef) -> list[tuple[str, str]]:
    return [(a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in fn.args.args]


def _schema_types() -> dict[tuple[str, str], str]:
    """Python type of each attribute as the ONNX parser hands it over: INT -> int, FLOAT -> float, STRING -> str."""
    from onnx.defs import OpSchema

    from moetrt.ops.topk_routing import onnx_schema as topk_schema

    python = {OpSchema.AttrType.INT: "int", OpSchema.AttrType.FLOAT: "float", OpSchema.AttrType.STRING: "str"}
    out = {}
    for name, attr in topk_schema().attributes.items():
        out[("TopKRouting", name)] = python[attr.type]
    spec = {a.name: a.kind.__name__ for a in SPARSE_MOE_SPEC.attrs}  # SparseMoE's attributes as its spec types them
    for plugin in ("SparseMoE", *SPARSE_MOE_PLUGINS):  # the pass writes plan integers and has_* flags as INT
        out.update({(plugin, name): spec.get(name, "int") for name in PLUGIN_ATTRIBUTES[plugin]})
    return out


def test_definitions_declare_the_node_attributes_in_order():
    defs = _definitions()
    source = TRT_DEFINITIONS.read_text()
    # tensorrt.plugin validates annotations as objects: string annotations would fail its issubclass checks
    assert not re.search(r"^from __future__ import annotations", source, re.M)
    assert {name.split("::")[1] for kind, name in defs if kind == "register"} == set(PLUGIN_ATTRIBUTES)
    assert {name.split("::")[1] for kind, name in defs if kind == "aot_impl"} == set(AOT_PLUGINS)
    assert {name.split("::")[1] for kind, name in defs if kind == "impl"} == set(JIT_PLUGINS)
    types_ = _schema_types()
    for (kind, plugin_id), fn in defs.items():
        namespace, plugin = plugin_id.split("::")
        assert namespace == "moetrt"
        params = _params(fn)
        tensors = [n for n, a in params if a.startswith("trtp.Tensor")]
        attrs = [(n, a) for n, a in params if not a.startswith("trtp.") and n not in ("outputs", "stream", "tactic")]
        if kind == "register":
            assert [n for n, _ in attrs] == list(PLUGIN_ATTRIBUTES[plugin]), plugin
            assert all(types_[(plugin, n)] == a for n, a in attrs), (plugin, attrs)
            assert not fn.args.defaults, f"{plugin}: tensorrt.plugin refuses default values"
        elif kind == "aot_impl":
            # _TemplateAOTPlugin.get_launch_params passes every attribute positionally
            assert [n for n, _ in attrs] == list(PLUGIN_ATTRIBUTES[plugin]), plugin
            assert [n for n, _ in params[-2:]] == ["outputs", "tactic"]
        else:
            assert [n for n, _ in attrs] == [a for a in PLUGIN_ATTRIBUTES[plugin] if a in dict(attrs)]
            assert [n for n, _ in params[-2:]] == ["outputs", "stream"]
        if kind != "register":
            register = defs[("register", plugin_id)]
            assert tensors == [n for n, a in _params(register) if a.startswith("trtp.Tensor")], plugin


def test_sparse_moe_inputs_match_the_onnx_node():
    """The JIT plugin takes every input of the op, the optional biases included (a plugin's inputs are fixed)."""
    defs = _definitions()
    tensors = lambda plugin: [n for n, a in _params(defs[("register", f"moetrt::{plugin}")]) if a.startswith("trtp.")]  # noqa: E731
    assert tensors("SparseMoE") == SPARSE_MOE_SPEC.input_names
    assert tensors("MoEGateUp")[:3] == ["x", "w_gate_up", "b_gate_up"]
    assert tensors("MoEDown")[:4] == ["h", "w_down", "b_down", "weights"]


# --- imports and errors ------------------------------------------------------------------------
def test_nothing_heavy_is_imported_on_import():
    script = (
        "import sys\n"
        "import moetrt, moetrt.optimize, moetrt.optimize.trt, moetrt.optimize.trt.build, moetrt.optimize.trt.profiles\n"
        "import moetrt.runtime, moetrt.runtime.backend_trt, moetrt.ops.plugins, moetrt.ops.plugins.aot\n"
        "heavy = [m for m in ('tensorrt', 'triton', 'polygraphy', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_missing_tensorrt_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    with pytest.raises(BackendMissingError, match="pip install tensorrt \\(10.9 or newer"):
        register_plugins()


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.26"))
    with pytest.raises(BackendMissingError, match=r"TensorRT >= 10.9 .* has 10.3.0.26"):
        register_plugins()
