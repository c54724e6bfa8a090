"""Fixtures of the optimize tests: canonical exports of ``tiny`` and of the tiny models of each
family, built once per test session."""

from __future__ import annotations

import warnings

import pytest

import moetrt


@pytest.fixture(scope="session")
def canonical(tmp_path_factory, request):
    """``canonical(variant, **export_options)`` -> (reference MoETransformer, exported folder), cached.

    ``variant``: ``"tiny"`` (the trained preset), a tiny Hugging Face variant (tests/hf_tiny.py),
    or a ``moetrt.MoEConfig`` for a small random model.
    """
    from moetrt.export import onnx_from_torch

    cache: dict = {}

    def get(variant, **options):
        key = (repr(variant), tuple(sorted(options.items())))
        if key not in cache:
            if isinstance(variant, moetrt.MoEConfig):
                model, name = moetrt.MoETransformer.from_config(variant, seed=3, std=0.2), "random"
            elif variant == "tiny":
                model, name = moetrt.from_pretrained("tiny"), "tiny"
            else:
                hf_tiny_model = request.getfixturevalue("hf_tiny_model")
                model, name = moetrt.from_pretrained(hf_tiny_model(variant)), variant
            folder = tmp_path_factory.mktemp(f"canonical-{name}") / "exported"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_from_torch(model, folder, progress=False, **options)
            cache[key] = (model, folder)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def optimized_variant(canonical, tmp_path_factory):
    """``optimized_variant(variant, **optimize_options)`` -> (reference, exported folder, optimized folder), cached."""
    from moetrt.optimize import optimize

    cache: dict = {}

    def get(variant, **options):
        key = (variant, tuple(sorted(options.items())))
        if key not in cache:
            model, folder = canonical(variant)
            out = tmp_path_factory.mktemp(f"{variant}-optimized") / "out"
            optimize(folder, out, progress=False, **options)
            cache[key] = (model, folder, out)
        return cache[key]

    return get
