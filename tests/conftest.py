"""Fixtures shared by every test folder.

``tests`` is a package (every subfolder too, so same-named test files cannot clash); test
modules import the helpers as ``from tests.hf_tiny import FAMILIES, VARIANTS, hf_tiny_model`` to
parametrize over the tiny Hugging Face models.
"""

from __future__ import annotations

import pytest
import torch

from tests.hf_tiny import FAMILIES, VARIANTS, hf_tiny_model as _hf_tiny_model

__all__ = ["FAMILIES", "VARIANTS"]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global torch seed."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The test models are tiny: one intra-op thread is fastest, and on a busy 2-core machine two
    threads competing with ONNX Runtime's made reference passes 5-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_tiny_model():
    """Factory ``hf_tiny_model(variant, seed=0, std=0.1, **config_overrides)`` -> a tiny transformers model.

    Needs ``transformers`` (the ``dev`` extra); tests using it skip where it is missing.
    """
    pytest.importorskip("transformers")
    return _hf_tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory ``tiny_checkpoint(variant, seed=0, **overrides)`` -> (transformers model, saved folder), cached."""
    pytest.importorskip("transformers")
    cache: dict = {}

    def make(variant: str, seed: int = 0, **overrides):
        key = (variant, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            model = _hf_tiny_model(variant, seed=seed, **overrides)
            folder = tmp_path_factory.mktemp(f"hf-{variant}")
            model.save_pretrained(folder)
            cache[key] = (model, folder)
        return cache[key]

    return make


# --- measured numbers, printed at the end of the run ------------------------------------------
_METRICS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def record_max():
    """``record_max(table, key, value)`` keeps the largest value per key; the tables print after the run."""

    def record(table: str, key: str, value: float) -> None:
        row = _METRICS.setdefault(table, {})
        row[key] = max(value, row.get(key, float("-inf")))

    return record


def pytest_terminal_summary(terminalreporter):
    for table, rows in sorted(_METRICS.items()):
        terminalreporter.section(table)
        width = max(len(k) for k in rows)
        for key, value in sorted(rows.items()):
            terminalreporter.write_line(f"{key:<{width}}  {value:.3e}")


# --- hypothesis profiles for the property tests ---------------------------------------------------
# "ci": a few dozen examples, derandomized (the same examples every run; a failure prints the
# falsifying example and a reproduce blob); "slow": many more, freshly random each run, selected
# with ``pytest -m slow``. No deadline: an example exports a model, seconds on a busy machine.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is in the dev extra; the property tests skip without it
    _hypothesis_settings = None
else:
    _hypothesis_settings.register_profile(
        "ci", max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True)
    _hypothesis_settings.register_profile("slow", max_examples=300, deadline=None, print_blob=True)


def slow_selected(config) -> bool:
    """Whether ``-m`` selects the ``slow`` tests (they are skipped otherwise, so CI runs without them)."""
    return "slow" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are skipped at collection, with the reason, unless ``-m`` selects them: a plain
    ``pytest`` (the README's test command, CI) stays within its time budget."""
    if slow_selected(config):
        return
    skip = pytest.mark.skip(reason="long-running (exports, engine builds or a Ray cluster): run with -m slow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(params=["ci", pytest.param("slow", marks=pytest.mark.slow)])
def property_settings(request):
    """``@property_settings(ci=N, slow=M)`` on an inner ``@given`` function: the profile's settings
    with that many examples (``property_settings.profile`` names the profile). Each property test
    runs twice: its "ci" variant by default, its "slow" variant only where ``-m`` selects ``slow``."""
    if _hypothesis_settings is None:
        pytest.skip("property tests need hypothesis (the dev extra)")
    profile = request.param
    if profile == "slow" and not slow_selected(request.config):
        pytest.skip("many more examples: run with -m slow")

    def make(ci: int, slow: int):
        return _hypothesis_settings(_hypothesis_settings.get_profile(profile),
                                    max_examples=ci if profile == "ci" else slow)

    make.profile = profile
    return make
