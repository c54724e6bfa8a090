"""Expert statistics: counts add up, agree across back ends, render, and fail clearly without router outputs."""

from __future__ import annotations

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.runtime import ExpertStats, ModelSpec, Session
from moetrt.runtime.backend import router_names

PROMPTS = ["once upon a time", "the cat sat on the mat", "dog"]

IMBALANCE_CASES = [  # (tokens per expert of one layer, max/mean)
    ([4, 4, 4, 4], 1.0),
    ([8, 0, 0, 0], 4.0),
    ([3, 1, 2, 2], 1.5),
]


def tokens_fed(result) -> int:
    """Real tokens the model processed: each prompt, plus every generated token but the last (never fed back)."""
    return sum(len(prompt) + len(new) - 1 for prompt, new in zip(result.prompts, result.tokens))


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_counts_sum_to_tokens_times_k_per_layer(backend, text_checkpoint, text_export):
    session = Session(text_checkpoint if backend == "torch" else text_export, backend=backend)
    result = session.generate(PROMPTS, max_new_tokens=12, expert_stats=True)
    stats = result.stats
    k = session.config.num_experts_per_tok
    assert stats.layers == session.config.moe_layers
    assert stats.counts.shape == (session.config.num_hidden_layers, session.config.num_experts)
    assert stats.tokens == tokens_fed(result)
    np.testing.assert_array_equal(stats.counts.sum(axis=1), stats.tokens * k)
    assert any(r == "stop" for r in result.finish_reasons), "a stopped row checks that it stops counting"


def test_torch_and_ort_count_the_same_routings(text_checkpoint, text_export):
    options = dict(max_new_tokens=16, temperature=0.9, seed=1, expert_stats=True)
    torch_stats = Session(text_checkpoint).generate(PROMPTS, **options).stats
    ort_stats = Session(text_export, backend="ort").generate(PROMPTS, **options).stats
    np.testing.assert_array_equal(torch_stats.counts, ort_stats.counts)


def test_export_without_router_outputs_says_how_to_get_them(hf_model_export):
    session = Session(hf_model_export, backend="ort")
    assert not session.spec.router_outputs
    with pytest.raises(MoetrtError, match="router outputs"):
        session.generate([[3, 4, 5]], max_new_tokens=2, expert_stats=True)


@pytest.mark.parametrize("counts,expected", IMBALANCE_CASES)
def test_imbalance_is_max_over_mean(counts, expected):
    stats = ExpertStats(layers=[0], num_experts=4, experts_per_token=2, counts=np.array([counts]))
    assert stats.imbalance[0] == pytest.approx(expected)


def test_add_skips_padding_and_stopped_rows():
    spec = ModelSpec(
        num_layers=2, num_kv_heads=1, head_dim=2, kv_dtype="float32", vocab_size=8, max_positions=16,
        moe_layers=(1,), num_experts=4, experts_per_token=2, router_outputs=True,
    )
    stats = ExpertStats.empty(spec)
    indices = np.array([[0, 1], [2, 3], [0, 2], [1, 3]], dtype=np.int32)  # [B*S = 4, K]
    stats.add({router_names(1)[1]: indices}, keep=np.array([True, False, True, True]))
    np.testing.assert_array_equal(stats.counts, [[2, 2, 1, 1]])
    assert stats.tokens == 3


def test_table_and_heatmap(text_checkpoint, tmp_path):
    stats = Session(text_checkpoint).generate(PROMPTS, max_new_tokens=8, expert_stats=True).stats
    table = stats.table().splitlines()
    assert f"{stats.tokens} tokens x top-2" in table[0]
    assert table[1].split()[:6] == ["layer", "max/mean", "e0", "e1", "e2", "e3"]
    for line, layer, counts, imbalance in zip(table[2:], stats.layers, stats.counts, stats.imbalance):
        fields = line.split()
        assert int(fields[0]) == layer and float(fields[1]) == pytest.approx(imbalance, abs=0.005)
        assert [int(f) for f in fields[2:6]] == counts.tolist()
    path = stats.heatmap(tmp_path / "experts.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_with_many_experts_names_the_busiest():
    counts = np.zeros((1, 32), dtype=np.int64)
    counts[0, 17] = 10
    counts[0, 3] = 6
    stats = ExpertStats(layers=[0], num_experts=32, experts_per_token=2, counts=counts, tokens=8)
    row = stats.table().splitlines()[2]
    bars = row.split()[-1]
    assert "e17 (10)" in row and len(bars) == 32 and bars[17] == "█" and bars[3] == "▅"
