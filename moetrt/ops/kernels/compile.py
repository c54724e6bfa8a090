"""Compile the kernels ahead of time for sm_90 (H100/H200) on a machine without a GPU.

``compile_for_sm90("topk_routing" | "sparse_moe" | "router_logits", ...)`` return, per
kernel, its PTX (what TensorRT plugins embed; the driver JIT-compiles it for the device), its
cubin when ``ptxas`` is available (Triton wheels bundle one), the entry name, shared memory,
warps, registers (read from the cubin), the launch grid as formulas of the run-time token count
``T``, and the run-time parameters in launch order. Sizes fixed by the model (E, K, D, F, the
dtype) are compiled in as constants, so only pointers and token-dependent counts remain.

Every Triton kernel takes two trailing pointer parameters after its own: ``global_scratch`` and
``profile_scratch`` (null is fine when the kernel reports no scratch, which these do not).

From the command line (writes ``<kernel>.ptx``, ``<kernel>.cubin`` and ``manifest.json``)::

    python -m moetrt.ops.kernels.compile sparse_moe --dtype bf16 --hidden 4096 --ffn 14336 \\
        --experts 8 --k 2 --out build/kernels
    python -m moetrt.ops.kernels.compile topk_routing --experts 8 --k 2 --normalize --out build/kernels
    python -m moetrt.ops.kernels.compile router_logits --dtype bf16 --hidden 4096 --experts 8 --out build/kernels
    python -m moetrt.ops.kernels.compile sparse_moe --dtype bf16 --hidden 2880 --ffn 2880 --experts 32 --k 4 \\
        --activation clamped_swiglu --gate-up-bias --down-bias --out build/kernels   # gpt-oss-20b
    python -m moetrt.ops.kernels.compile sparse_moe_fp8 --dtype bf16 --hidden 7168 --ffn 2048 --experts 256 \\
        --k 8 --tokens 4096 --out build/kernels   # DeepSeek-V3's experts in FP8, 128 x 128 weight blocks

Run it in a process where triton is not in interpreter mode (``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moetrt.ops.kernels.configs import (
    SparseMoEConfig,
    next_power_of_2,
    router_logits_blocks,
    sparse_moe_config,
    topk_routing_blocks,
)

__all__ = [
    "KernelSpec",
    "topk_routing_specs",
    "sparse_moe_specs",
    "router_logits_specs",
    "sparse_moe_fp8_specs",
    "compile_spec",
    "compile_for_sm90",
    "main",
]

SM90 = ("cuda", 90, 32)  # GPUTarget(backend, capability, warp size)
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32", "float32": "fp32"}
OPS = ("topk_routing", "sparse_moe", "router_logits", "sparse_moe_fp8")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialised for one model: what to compile and how to launch it."""

    name: str  # role in the op, e.g. "moe_gate_up"
    kernel: str  # attribute of moetrt.ops.kernels.<module>
    module: str  # "topk_routing_triton" | "sparse_moe_triton"
    signature: dict[str, str]  # run-time parameter -> Triton type ("*bf16", "i32", "fp32"), launch order
    constants: dict[str, object]  # parameters compiled in
    num_warps: int
    num_stages: int
    grid: tuple[str, str, str]  # formulas of T (tokens); cdiv(a, b) = ceil(a / b)
    aligned: tuple[str, ...] = field(default=())  # parameters promised divisible by 16 (pointers: 16-byte aligned)

    def jit_function(self):
        import importlib

        return getattr(importlib.import_module(f"moetrt.ops.kernels.{self.module}"), self.kernel)


def _dtype(dtype) -> str:
    key = str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}")
    return DTYPES[key]


def _pointers(signature: dict[str, str]) -> tuple[str, ...]:
    """The pointer parameters of a signature (promised 16-byte aligned)."""
    return tuple(name for name, ty in signature.items() if ty.startswith("*"))


def topk_routing_specs(num_experts: int, k: int, scoring: str = "softmax", normalize: int = 0) -> list[KernelSpec]:
    """The routing kernel for E experts and top-k (T and ``scale`` stay run-time)."""
    from moetrt.ops.topk_routing import SCORINGS

    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..num_experts={num_experts}, got {k}")
    block_t, block_e, num_warps = topk_routing_blocks(None, num_experts)
    return [
        KernelSpec(
            name="topk_routing",
            kernel="topk_routing_kernel",
            module="topk_routing_triton",
            signature={
                "logits_ptr": "*fp32",
                "weights_ptr": "*fp32",
                "indices_ptr": "*i32",
                "num_tokens": "i32",
                "scale": "fp32",
            },
            constants={
                "num_experts": num_experts,
                "K": k,
                "SIGMOID": scoring == "sigmoid",
                "NORMALIZE": int(normalize),
                "BLOCK_T": block_t,
                "BLOCK_E": block_e,
                "BLOCK_K": next_power_of_2(k),
            },  # fmt: skip
            num_warps=num_warps,
            num_stages=1,
            grid=(f"cdiv(T, {block_t})", "1", "1"),
            aligned=("logits_ptr", "weights_ptr", "indices_ptr"),
        )
    ]


def sparse_moe_specs(
    dtype,
    hidden_size: int,
    ffn: int,
    num_experts: int,
    k: int,
    num_tokens: int = 1,
    config: SparseMoEConfig | None = None,
    activation: str = "silu",
    has_b_gate_up: bool = False,
    has_b_down: bool = False,
) -> list[KernelSpec]:
    """The four SparseMoE kernels in launch order: align, gate|up, down, combine.

    ``num_tokens`` picks the row of the config table (one engine profile per regime: e.g. 1 for
    decode, 4096 for prefill); ``config`` overrides it. ``activation`` and the biases pick the
    variant, as ``sparse_moe_triton`` launches it: a bias is a pointer parameter only when present
    (``b_ptr`` after ``w_ptr``), and the clamped activation takes ``alpha`` and ``limit`` as
    run-time float32 parameters after ``num_pairs`` (SwiGLU takes neither).
    """
    from moetrt.ops.kernels.sparse_moe_triton import align_block_p
    from moetrt.ops.sparse_moe import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    ty = _dtype(dtype)
    config = config or sparse_moe_config(num_tokens, num_experts, k, 4 if ty == "fp32" else 2)
    bm, gu, dn = config.block_m, config.gate_up, config.down
    block_d = min(config.combine_block_d, next_power_of_2(hidden_size))
    max_blocks = f"cdiv(T*{k} + min({num_experts}, T*{k})*{bm - 1}, {bm})"
    upcast_precision = {"UPCAST": False, "PRECISION": "ieee" if ty == "fp32" else "tf32"}
    align_sig = {
        "indices_ptr": "*i32",
        "sorted_ids_ptr": "*i32",
        "expert_ids_ptr": "*i32",
        "num_padded_ptr": "*i32",
        "num_pairs": "i32",
    }
    clamped = activation == "clamped_swiglu"
    gate_up_sig = {
        "x_ptr": f"*{ty}", "w_ptr": f"*{ty}", **({"b_ptr": f"*{ty}"} if has_b_gate_up else {}), "h_ptr": f"*{ty}",
        "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "num_pairs": "i32",
        **({"alpha": "fp32", "limit": "fp32"} if clamped else {}),
    }  # fmt: skip
    down_sig = {
        "h_ptr": f"*{ty}", "w_ptr": f"*{ty}", **({"b_ptr": f"*{ty}"} if has_b_down else {}), "out_ptr": f"*{ty}",
        "routing_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
        "num_pairs": "i32",
    }  # fmt: skip
    combine_sig = {"slots_ptr": f"*{ty}", "indices_ptr": "*i32", "y_ptr": f"*{ty}"}
    align_constants = {
        "num_experts": num_experts, "BLOCK_M": bm, "BLOCK_E": next_power_of_2(num_experts),
        "BLOCK_P": align_block_p(num_experts),
    }  # fmt: skip
    # absent parameters are compiled in as None, as sparse_moe_triton passes them; the routing weights multiply the
    # experts' outputs (WEIGHT_INPUT 0): the TensorRT plugins that run these kernels refuse weight_input=1 (Llama 4)
    gate_up_constants = {
        **({} if has_b_gate_up else {"b_ptr": None}), **({} if clamped else {"alpha": None, "limit": None}),
        "D": hidden_size, "F": ffn, "K": k, "BLOCK_M": bm, "BLOCK_N": gu.block_n, "BLOCK_K": gu.block_k,
        **upcast_precision, "GROUP_M": gu.group_m, "ACTIVATION": activation, "routing_ptr": None, "WEIGHT_INPUT": 0,
    }  # fmt: skip
    down_constants = {
        **({} if has_b_down else {"b_ptr": None}),
        "D": hidden_size, "F": ffn, "BLOCK_M": bm, "BLOCK_N": dn.block_n, "BLOCK_K": dn.block_k, **upcast_precision,
        "GROUP_M": dn.group_m, "WEIGHT_INPUT": 0,
    }  # fmt: skip
    combine_constants = {"num_experts": num_experts, "D": hidden_size, "K": k, "BLOCK_D": block_d}
    module = "sparse_moe_triton"
    return [
        KernelSpec(
            "moe_align", "moe_align_kernel", module, align_sig, align_constants,
            num_warps=4, num_stages=1, grid=("1", "1", "1"), aligned=_pointers(align_sig),
        ),
        KernelSpec(
            "moe_gate_up", "moe_gate_up_kernel", module, gate_up_sig, gate_up_constants,
            num_warps=gu.num_warps, num_stages=gu.num_stages, grid=(max_blocks, str(-(-ffn // gu.block_n)), "1"),
            aligned=_pointers(gate_up_sig),
        ),
        KernelSpec(
            "moe_down", "moe_down_kernel", module, down_sig, down_constants,
            num_warps=dn.num_warps, num_stages=dn.num_stages,
            grid=(max_blocks, str(-(-hidden_size // dn.block_n)), "1"), aligned=_pointers(down_sig),
        ),
        KernelSpec(
            "moe_combine", "moe_combine_kernel", module, combine_sig, combine_constants,
            num_warps=4 if block_d >= 512 else 1, num_stages=1, grid=("T", str(-(-hidden_size // block_d)), "1"),
            aligned=_pointers(combine_sig),
        ),
    ]  # fmt: skip


def router_logits_specs(dtype, hidden_size: int, num_experts: int, num_tokens: int | None = None,
                        has_bias: bool = False) -> list[KernelSpec]:
    """The router-logits kernel for one model (the torch back end's CUDA path; TensorRT runs the
    exported ``MatMul`` itself). ``num_tokens=None``: the blocks for large T, launched for any T.
    ``has_bias``: a router bias ``[E]`` in the model dtype (``b_ptr``; compiled in as None without)."""
    ty = _dtype(dtype)
    block_t, block_e, block_k, use_dot, num_warps = router_logits_blocks(
        4096 if num_tokens is None else num_tokens, num_experts, hidden_size
    )
    signature = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", **({"b_ptr": f"*{ty}"} if has_bias else {}), "out_ptr": "*fp32",
                 "num_tokens": "i32"}
    constants = {**({} if has_bias else {"b_ptr": None}),
        "D": hidden_size, "E": num_experts, "BLOCK_T": block_t, "BLOCK_E": block_e, "BLOCK_K": block_k,
        "USE_DOT": use_dot,
    }  # fmt: skip
    return [
        KernelSpec(
            "router_logits", "router_logits_kernel", "router_logits_triton", signature, constants,
            num_warps=num_warps, num_stages=3, grid=(f"cdiv(T, {block_t})", str(-(-num_experts // block_e)), "1"),
            aligned=_pointers(signature),
        )
    ]  # fmt: skip


def sparse_moe_fp8_specs(
    dtype,
    hidden_size: int,
    ffn: int,
    num_experts: int,
    k: int,
    num_tokens: int = 1,
    config: SparseMoEConfig | None = None,
    activation: str = "silu",
    weight_scales: str = "block",
    activation_scales: str = "token",
    block: tuple[int, int] = (128, 128),
) -> list[KernelSpec]:
    """The FP8-expert SparseMoE kernels in launch order, as ``sparse_moe_fp8_triton`` launches them:
    quantize x, align, gate|up, quantize h, down, combine (``dtype``: the model's, of x, h and y)."""
    from moetrt.fp8 import activation_block, weight_block
    from moetrt.ops.kernels.configs import fp8_block_k, sparse_moe_fp8_config
    from moetrt.ops.kernels.sparse_moe_fp8_triton import FP8_ACTIVATIONS, fp8_quantize_blocks

    if activation not in FP8_ACTIVATIONS:
        raise ValueError(f"activation must be one of {FP8_ACTIVATIONS}, got {activation!r}")
    ty = _dtype(dtype)
    gate_up_block = weight_block(weight_scales, (2 * ffn, hidden_size), block)
    down_block = weight_block(weight_scales, (hidden_size, ffn), block)
    x_group = activation_block(activation_scales, hidden_size, block)[1]
    h_group = activation_block(activation_scales, ffn, block)[1]
    narrow = [c for c, row in ((x_group, hidden_size), (gate_up_block[1], hidden_size), (h_group, ffn),
                               (down_block[1], ffn)) if c < row]
    config = config or sparse_moe_fp8_config(num_tokens, num_experts, k, fp8_block_k(*narrow))
    bm, gu, dn = config.block_m, config.gate_up, config.down
    bf16_specs = sparse_moe_specs(dtype, hidden_size, ffn, num_experts, k, config=config)
    align, combine = bf16_specs[0], bf16_specs[3]
    max_blocks = bf16_specs[1].grid[0]  # the aligned blocks, as for the bf16 kernels

    def quantize(name: str, cols: int, group: int, rows: str) -> KernelSpec:
        block_r, block_c, num_warps = fp8_quantize_blocks(group)
        sig = {"x_ptr": f"*{ty}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "num_rows": "i32"}
        constants = {"K": cols, "GROUP": group, "BLOCK_R": block_r, "BLOCK_C": block_c, "EMULATE_RNE": False}
        return KernelSpec(name, "fp8_quantize_kernel", "sparse_moe_fp8_triton", sig, constants, num_warps=num_warps,
                          num_stages=1, grid=(f"cdiv({rows}, {block_r})", str(-(-cols // group)), "1"),
                          aligned=_pointers(sig))

    ids = {"sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "num_pairs": "i32"}
    gate_up_sig = {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "h_ptr": f"*{ty}",
                   **ids}
    down_sig = {"hq_ptr": "*fp8e4nv", "hs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "out_ptr": f"*{ty}",
                "routing_ptr": "*fp32", **ids}
    module = "sparse_moe_fp8_triton"
    return [
        quantize("fp8_quantize_x", hidden_size, x_group, "T"),
        align,
        KernelSpec(
            "moe_gate_up_fp8", "moe_gate_up_fp8_kernel", module, gate_up_sig,
            {"D": hidden_size, "F": ffn, "K": k, "X_GROUP": x_group, "W_BN": gate_up_block[0], "W_BK": gate_up_block[1],
             "BLOCK_M": bm, "BLOCK_N": gu.block_n, "BLOCK_K": gu.block_k, "GROUP_M": gu.group_m, "ACTIVATION": activation},
            num_warps=gu.num_warps, num_stages=gu.num_stages, grid=(max_blocks, str(-(-ffn // gu.block_n)), "1"),
            aligned=_pointers(gate_up_sig),
        ),
        quantize("fp8_quantize_h", ffn, h_group, f"T*{k}"),
        KernelSpec(
            "moe_down_fp8", "moe_down_fp8_kernel", module, down_sig,
            {"D": hidden_size, "F": ffn, "H_GROUP": h_group, "W_BN": down_block[0], "W_BK": down_block[1],
             "BLOCK_M": bm, "BLOCK_N": dn.block_n, "BLOCK_K": dn.block_k, "GROUP_M": dn.group_m},
            num_warps=dn.num_warps, num_stages=dn.num_stages, grid=(max_blocks, str(-(-hidden_size // dn.block_n)), "1"),
            aligned=_pointers(down_sig),
        ),
        combine,
    ]  # fmt: skip


def _sparse_moe_workspace(ty: str, hidden_size: int, ffn: int, num_experts: int, k: int, block_m: int) -> dict:
    """Scratch buffers between the SparseMoE kernels, sizes as formulas of T."""
    max_blocks = f"cdiv(T*{k} + min({num_experts}, T*{k})*{block_m - 1}, {block_m})"
    return {
        "sorted_ids": {"dtype": "i32", "elements": f"{max_blocks}*{block_m}", "written_by": "moe_align"},
        "expert_ids": {"dtype": "i32", "elements": max_blocks, "written_by": "moe_align"},
        "num_padded": {"dtype": "i32", "elements": "1", "written_by": "moe_align"},
        "h": {"dtype": ty, "elements": f"T*{k}*{ffn}", "written_by": "moe_gate_up"},
        "slots": {"dtype": ty, "elements": f"T*{k}*{hidden_size}", "written_by": "moe_down"},
    }


def _registers(cubin: bytes | None) -> tuple[int | None, int | None]:
    """(registers, local-memory bytes) per thread, read from the cubin with cuobjdump."""
    if not cubin:
        return None, None
    tool = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run(
                [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    reg, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def compile_spec(spec: KernelSpec, target: tuple[str, int, int] = SM90) -> dict:
    """Compile one kernel for ``target`` (default sm_90) without a GPU; returns PTX, cubin and launch data."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moetrt.ops.kernels import triton_mode

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < (3, 3):
        raise RuntimeError(
            f"offline compilation needs triton >= 3.3 (name-keyed ASTSource signatures), found {triton.__version__}; "
            "pip install -U 'triton>=3.3'"
        )
    if triton_mode() == "interpret":
        raise RuntimeError(
            "triton was imported in interpreter mode (TRITON_INTERPRET=1), which cannot compile; run the "
            "offline compile in a process without TRITON_INTERPRET"
        )
    fn = spec.jit_function()
    missing = [name for name in fn.arg_names if name not in spec.signature and name not in spec.constants]
    assert not missing, f"{spec.name}: parameters neither run-time nor constant: {missing}"
    signature = {name: spec.signature.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constants), attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget(*target), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    )
    meta = compiled.metadata
    cubin = compiled.asm.get("cubin")
    registers, local_bytes = _registers(cubin)
    params = [[name, ty] for name, ty in spec.signature.items()] + [
        ["global_scratch", "*i8"],
        ["profile_scratch", "*i8"],
    ]
    return {
        "name": spec.name,
        "entry": meta.name,
        "target": f"sm_{target[1]}",
        "ptx": compiled.asm["ptx"],
        "cubin": cubin,
        "shared": meta.shared,
        "num_warps": meta.num_warps,
        "num_stages": spec.num_stages,
        "registers": registers,
        "local_bytes": local_bytes,
        "global_scratch_size": getattr(meta, "global_scratch_size", 0),
        "profile_scratch_size": getattr(meta, "profile_scratch_size", 0),
        "grid": list(spec.grid),
        "block": [meta.num_warps * target[2], 1, 1],
        "params": params,
        "constants": {key: value for key, value in spec.constants.items()},
    }


def compile_for_sm90(op: str, **attrs) -> dict:
    """Compile every kernel of ``op`` for sm_90.

    ``op="topk_routing"``: ``num_experts, k, scoring="softmax", normalize=False``.
    ``op="sparse_moe"``: ``dtype, hidden_size, ffn, num_experts, k, num_tokens=1, config=None,
    activation="silu", has_b_gate_up=False, has_b_down=False``.
    ``op="router_logits"``: ``dtype, hidden_size, num_experts, num_tokens=None, has_bias=False``.
    ``op="sparse_moe_fp8"``: ``dtype, hidden_size, ffn, num_experts, k, num_tokens=1, config=None,
    activation="silu", weight_scales="block", activation_scales="token", block=(128, 128)``.
    Returns ``{"op", "target", "triton", "kernels": [per kernel, in launch order], "workspace"}``.
    """
    import triton

    if op == "topk_routing":
        specs, workspace = topk_routing_specs(**attrs), {}
    elif op == "sparse_moe":
        specs = sparse_moe_specs(**attrs)
        bm = specs[1].constants["BLOCK_M"]
        workspace = _sparse_moe_workspace(
            _dtype(attrs["dtype"]), attrs["hidden_size"], attrs["ffn"], attrs["num_experts"], attrs["k"], bm
        )
    elif op == "router_logits":
        specs, workspace = router_logits_specs(**attrs), {}
    elif op == "sparse_moe_fp8":
        specs = sparse_moe_fp8_specs(**attrs)
        workspace = {}  # the quantized x, h and their scales beside the bf16 path's buffers: sized in sparse_moe_fp8_triton
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return {
        "op": op,
        "target": "sm_90",
        "triton": triton.__version__,
        "kernels": [compile_spec(spec) for spec in specs],
        "workspace": workspace,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compile the moetrt Triton kernels to PTX/cubin for sm_90 (no GPU needed)."
    )
    parser.add_argument("op", choices=OPS)
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for <kernel>.ptx, <kernel>.cubin, manifest.json"
    )
    parser.add_argument("--experts", type=int, required=True, help="E")
    parser.add_argument("--scoring", default="softmax", help="topk_routing: softmax | sigmoid")
    parser.add_argument("--normalize", action="store_true", help="topk_routing: renormalise the k weights")
    parser.add_argument("--k", type=int, help="topk_routing, sparse_moe: routed experts per token")
    parser.add_argument("--dtype", default="bf16", help="sparse_moe, router_logits: bf16 | fp16 | fp32")
    parser.add_argument("--hidden", type=int, help="sparse_moe, router_logits: D")
    parser.add_argument("--ffn", type=int, help="sparse_moe: F")
    parser.add_argument("--tokens", type=int, default=1, help="sparse_moe: token count that picks the block config")
    parser.add_argument("--activation", default="silu", help="sparse_moe: silu | clamped_swiglu")
    parser.add_argument("--gate-up-bias", action="store_true", help="sparse_moe: the experts have b_gate_up [E, 2F]")
    parser.add_argument("--down-bias", action="store_true", help="sparse_moe: the experts have b_down [E, D]")
    parser.add_argument("--bias", action="store_true", help="router_logits: the router has a bias [E]")
    parser.add_argument("--weight-scales", default="block", help="sparse_moe_fp8: block (128 x 128) | channel")
    parser.add_argument("--activation-scales", default="token", help="sparse_moe_fp8: token | block (128 columns)")
    args = parser.parse_args(argv)
    if args.op in ("topk_routing", "sparse_moe") and args.k is None:
        parser.error(f"{args.op} needs --k")
    if args.op == "router_logits":
        if args.hidden is None:
            parser.error("router_logits needs --hidden")
        result = compile_for_sm90(args.op, dtype=args.dtype, hidden_size=args.hidden, num_experts=args.experts,
                                  has_bias=args.bias)
    elif args.op == "topk_routing":
        result = compile_for_sm90(
            args.op, num_experts=args.experts, k=args.k, scoring=args.scoring, normalize=args.normalize
        )
    elif args.op == "sparse_moe_fp8":
        if args.hidden is None or args.ffn is None or args.k is None:
            parser.error("sparse_moe_fp8 needs --hidden, --ffn and --k")
        result = compile_for_sm90(
            args.op, dtype=args.dtype, hidden_size=args.hidden, ffn=args.ffn, num_experts=args.experts, k=args.k,
            num_tokens=args.tokens, activation=args.activation, weight_scales=args.weight_scales,
            activation_scales=args.activation_scales,
        )  # fmt: skip
    else:
        if args.hidden is None or args.ffn is None:
            parser.error("sparse_moe needs --hidden and --ffn")
        result = compile_for_sm90(
            args.op, dtype=args.dtype, hidden_size=args.hidden, ffn=args.ffn, num_experts=args.experts, k=args.k,
            num_tokens=args.tokens, activation=args.activation, has_b_gate_up=args.gate_up_bias,
            has_b_down=args.down_bias,
        )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for kernel in result["kernels"]:
        (args.out / f"{kernel['name']}.ptx").write_text(kernel.pop("ptx"))
        cubin = kernel.pop("cubin")
        if cubin:
            (args.out / f"{kernel['name']}.cubin").write_bytes(cubin)
        print(
            f"{kernel['name']:14s} entry={kernel['entry']} shared={kernel['shared']}B warps={kernel['num_warps']} "
            f"registers={kernel['registers']} grid={kernel['grid']}"
        )
    (args.out / "manifest.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
