"""Fixtures of the parity tests: exports built once per session, and broken copies of them."""

from __future__ import annotations

import shutil
import warnings

import onnx
import pytest

import moetrt


@pytest.fixture(scope="session")
def parity_export(tmp_path_factory):
    """Factory ``parity_export(variant, dtype="fp32")`` -> (fp32 reference MoETransformer, exported folder).

    ``variant``: "tiny" (the shipped trained model) or a tests/hf_tiny.py variant. Cached for the session.
    """
    from moetrt.export import onnx_from_torch

    cache: dict = {}

    def get(variant: str, dtype: str = "fp32"):
        if variant not in cache:
            if variant == "tiny":
                cache[variant] = moetrt.from_pretrained("tiny")
            else:
                pytest.importorskip("transformers")
                from tests.hf_tiny import hf_tiny_model

                cache[variant] = moetrt.from_pretrained(hf_tiny_model(variant))
        model = cache[variant]
        key = (variant, dtype)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"parity-{variant}-{dtype}") / "onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_from_torch(model, folder, dtype=dtype, progress=False)
            cache[key] = folder
        return model, cache[key]

    return get


@pytest.fixture
def broken_copy(tmp_path):
    """``broken_copy(folder, bug)`` -> a copy of an exported folder whose model.onnx went through ``bug(proto)``."""

    def make(folder, bug, name="broken"):
        out = tmp_path / name
        shutil.copytree(folder, out)
        proto = onnx.load(str(out / "model.onnx"))
        bug(proto)
        onnx.save(proto, str(out / "model.onnx"))
        return out

    return make
