"""SHA-256 of every test export, to prove a refactor leaves exports byte-identical.

For each tiny transformers variant of ``tests/hf_tiny.py`` (and the shipped ``tiny`` preset):
the in-memory export (fp32, fp16, fp32 with router outputs), the streamed export of the
transformers checkpoint folder, and ``moetrt.save_pretrained``'s files. ``model.onnx`` is hashed
without the exporter's per-node debug metadata (``pkg.torch.onnx.stack_trace``, ``namespace``,
``class_hierarchy``, ...: source file paths, line numbers and the Python classes a node was
traced in, so any edit of ``model.py`` or a moved class would change them); everything that
computes (nodes, attributes, names, function bodies, initializers, opsets, model metadata) counts. Run it before and
after a change and diff the two files::

    python scripts/export_digests.py before.json
    ... change ...
    python scripts/export_digests.py after.json && diff before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def onnx_digest(path: Path) -> str:
    """SHA-256 of a model.onnx without its nodes' debug metadata."""
    import hashlib

    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def strip(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g)
                for g in attr.graphs:
                    strip(g)

    strip(proto.graph)
    for fn in proto.functions:
        strip(fn)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write the digests to")
    parser.add_argument("--variants", nargs="*", help="only these tiny variants (default: all)")
    args = parser.parse_args()

    import moetrt
    from moetrt.artifact import sha256_file
    from moetrt.export import onnx_from_torch
    from tests.hf_tiny import VARIANTS, hf_tiny_model

    warnings.simplefilter("ignore")
    digests: dict[str, dict[str, str]] = {}

    def record(key: str, folder: Path) -> None:
        digests[key] = {p.name: onnx_digest(p) if p.name == "model.onnx" else sha256_file(p)
                        for p in sorted(folder.iterdir()) if p.is_file() and p.name != "moetrt.json"}
        print(key, " ".join(f"{n}={d[:12]}" for n, d in digests[key].items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {name: None for name in (args.variants or VARIANTS)}
        if not args.variants:
            sources["preset:tiny"] = "tiny"
        for name in sources:
            if name.startswith("preset:"):
                model = moetrt.from_pretrained(sources[name])
            else:
                hf = hf_tiny_model(name)
                hf.save_pretrained(tmp / f"{name}-hf")
                model = moetrt.from_pretrained(hf)
                onnx_from_torch(tmp / f"{name}-hf", tmp / f"{name}-streamed", progress=False)
                record(f"{name}/streamed", tmp / f"{name}-streamed")
                moetrt.save_pretrained(model, tmp / f"{name}-saved")
                record(f"{name}/save_pretrained", tmp / f"{name}-saved")
            for flavour, kwargs in {"fp32": {}, "fp16": {"dtype": "fp16"},
                                    "fp32-router": {"router_outputs": True}}.items():
                out = tmp / f"{name}-{flavour}"
                onnx_from_torch(model, out, progress=False, external_data=True, **kwargs)
                record(f"{name}/{flavour}", out)
    Path(args.out).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
