"""Checks every model family's own test module runs on its tiny transformers model: greedy tokens against
transformers' ``generate``, the streamed export against the in-memory one, refusals of an edited config.json.

``tests/moetrt/test_<family>.py`` builds the model and its export once per module and calls these.
"""

from __future__ import annotations

import json

import torch

import moetrt
from tests.hf_tiny import edited_checkpoint, hf_greedy
from tests.hf_tiny import reference_and_export as export

__all__ = ["PROMPTS", "STEPS", "PAD", "export", "assert_greedy_matches_generate", "assert_streamed_export_equal",
           "edited_checkpoint", "state_dicts_equal", "optimize_ort_cpu", "assert_saved_round_trips"]

# three prompts of different lengths (left-padded together), longer than the tiny sliding windows
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]
STEPS = 32
PAD = 0


def assert_greedy_matches_generate(hf_model, model, folder, backend: str) -> None:
    """32 greedy tokens of ``PROMPTS`` on ``backend`` (torch: the model; ort: its export) equal transformers'."""
    from moetrt.runtime import Session

    expected = hf_greedy(hf_model, PROMPTS, STEPS, PAD)
    source = model if backend == "torch" else folder
    assert Session(source, backend=backend).generate(PROMPTS, max_new_tokens=STEPS, stop_tokens=()).tokens == expected


def assert_streamed_export_equal(hf_model, in_memory, tmp_path) -> None:
    """The export streamed from ``hf_model``'s saved folder holds the in-memory export's initializers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from moetrt.export import onnx_from_torch

    hf_model.save_pretrained(tmp_path / "ckpt")
    streamed = onnx_from_torch(tmp_path / "ckpt", tmp_path / "streamed", progress=False)

    def initializers(folder):
        graph = onnx.load(str(folder / "model.onnx")).graph
        return {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    a, b = initializers(streamed), initializers(in_memory)
    assert a.keys() == b.keys()
    differ = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not differ, differ[:5]


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the parameters that differ between two models of the same config."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [name for name in sa if not torch.equal(sa[name], sb[name])]


def optimize_ort_cpu(model, folder, out) -> tuple[dict, list[str]]:
    """``optimize --target ort-cpu`` of ``folder`` with every MoE layer the fused op takes lowered (``always``):
    (the lower_moe pass's record in moetrt.json, the optimized graph's ops as ``domain::type``). Asserts that 12
    greedy tokens of ``PROMPTS`` on the optimized folder are the reference ``model``'s."""
    import onnx

    from moetrt.optimize import optimize
    from moetrt.runtime import Session

    optimize(folder, out, target="ort-cpu", moe_lowering="always", progress=False)
    meta = json.loads((out / "moetrt.json").read_text())
    (lowering,) = [p for p in meta["optimize"]["passes"] if p["name"] == "lower_moe"]
    ops = [f"{n.domain}::{n.op_type}" for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    got = Session(out, backend="ort").generate(PROMPTS, max_new_tokens=12, stop_tokens=()).tokens
    assert got == Session(model, backend="torch").generate(PROMPTS, max_new_tokens=12, stop_tokens=()).tokens
    return lowering, ops


def assert_saved_round_trips(hf_model, model, folder, rel_tol: float = 1e-5) -> str:
    """``folder`` (``moetrt.save_pretrained`` of ``model``) loads in transformers with nothing missing or unused,
    gives ``hf_model``'s logits, and loads back into moetrt exactly; returns the class transformers built."""
    import transformers

    from tests.hf_tiny import hf_forward, rel_err

    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager", output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    ids = torch.tensor(PROMPTS[:1])
    ref, _ = hf_forward(hf_model, ids)
    got, _ = hf_forward(back.eval(), ids)
    assert rel_err(got, ref) <= rel_tol
    again = moetrt.from_pretrained(folder)
    assert again.config == model.config and not state_dicts_equal(model, again)
    return type(back).__name__
