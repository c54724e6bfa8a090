"""Model configuration: one dataclass, validated, with named presets.

Field names follow Hugging Face transformers where a family agrees on one (``hidden_size``,
``num_key_value_heads``); the MoE fields are the union of what Mixtral, Qwen2-MoE, Qwen3-MoE
and OLMoE need, named after what they do.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MoEConfig", "PRESETS", "SCORINGS", "QK_NORMS", "GROUP_SCORINGS"]

# sparsemixer: PhiMoE's top-2 with jitter-eps masking (TopKRouting's scoring of that name)
SCORINGS = ("softmax", "sigmoid", "sparsemixer")
# the experts' activation, moetrt::SparseMoE's `activation` attribute: silu (SwiGLU) or gpt-oss's
# clamped SwiGLU, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit),
# or gelu_tanh (GeGLU with the tanh GELU, Gemma 4: its dense MLPs use it too)
ACTIVATIONS = ("silu", "clamped_swiglu", "gelu_tanh")
# how a group of experts is scored for group-limited routing (TopKRouting's group_scoring)
GROUP_SCORINGS = ("top2_sum", "max")
# per-layer attention kinds (transformers' layer_types): full causal, or causal within sliding_window
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention", "chunked_attention")
# linear_attention: a Gated DeltaNet layer (Qwen3-Next, Qwen3.5-MoE) in place of attention, see the linear_* fields
# chunked_attention: causal within the same attention_chunk_size-long chunk of positions (Llama 4)
# None: no q/k norm; "head": RMSNorm over head_dim per head (Qwen3-MoE);
# "full": RMSNorm over the whole projection before the head split (OLMoE);
# "l2": a weightless RMSNorm over head_dim per head, on the layers that rotate only (Llama 4's use_qk_norm).
QK_NORMS = (None, "head", "full", "l2")


@dataclass
class MoEConfig:
    """A decoder-only MoE transformer.

    Shape letters used across the project: ``T`` tokens, ``E`` experts, ``D`` model dim
    (``hidden_size``), ``F`` expert dim (``intermediate_size``), ``K`` routed experts per token.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    # experts
    num_experts: int = 8
    num_experts_per_tok: int = 2
    intermediate_size: int = 14336  # F of each routed expert
    activation: str = "silu"
    swiglu_alpha: float = 1.702  # clamped_swiglu only
    swiglu_limit: float = 7.0  # clamped_swiglu only
    expert_bias: bool = False  # biases on the experts' gate/up [E, 2F] and down [E, D] (gpt-oss)
    router_bias: bool = False  # bias on the router's logits [E] (gpt-oss)
    # router (the moetrt::TopKRouting attributes)
    scoring: str = "softmax"
    normalize_topk: bool = True
    routed_scaling_factor: float = 1.0
    # DeepSeek-V3 routing (TopKRouting version 2): a learned bias [E] added to the scores for choosing
    # the experts only (e_score_correction_bias; the weights come from the unbiased scores), and
    # group-limited choice: the experts form n_group groups, a token picks among the topk_group best
    # groups, a group scored by the sum of its top-2 biased scores ("top2_sum") or their max ("max")
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_scoring: str = "top2_sum"
    # shared expert beside the routed ones (Qwen2-MoE; DeepSeek's n_shared_experts merged into one); 0 = none
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = True  # sigmoid(Linear(D, 1)) gate on the shared expert (Qwen2-MoE; not DeepSeek)
    # dense layers among MoE layers (Qwen2/3-MoE): layer i is MoE iff
    # i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    dense_intermediate_size: int | None = None  # F of dense layers; None: intermediate_size
    # attention
    qk_norm: str | None = None
    clip_qkv: float | None = None  # OLMoE
    attention_bias: bool = False  # bias on q, k, v projections
    attention_out_bias: bool = False  # bias on o_proj
    sliding_window: int | None = None
    # per layer, "full_attention" or "sliding_attention" (gpt-oss); None: sliding_window (if any) on every layer
    layer_types: tuple[str, ...] | None = None
    attention_sinks: bool = False  # a learned per-head logit in every softmax, dropped after it (gpt-oss)
    # the leading dims of each head RoPE rotates (partial rotary: GLM-4.5, MiniMax-M2); None: the whole head
    rotary_dim: int | None = None
    # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash), on when kv_lora_rank is set:
    # keys and values are expanded from a cached latent [B, P, kv_lora_rank] by kv_b_proj, beside one
    # rotary key [B, P, qk_rope_head_dim] shared by all heads; q from a rank-q_lora_rank bottleneck (None:
    # one projection). A head's q.k dim is head_dim = qk_nope_head_dim + qk_rope_head_dim (rotary_dim
    # = qk_rope_head_dim), its value dim v_head_dim.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Gemma 4: the embeddings times embedding_multiplier (sqrt(hidden_size)); logits soft-capped,
    # cap * tanh(logits / cap); attention scores times attention_scale (None: head_dim^-0.5); values
    # through a weightless RMSNorm per head (value_norm); "sandwich" norms (the attention output normed
    # before the residual add, a norm before and after the feed-forward); moe_beside_dense: each MoE
    # layer runs a dense MLP (dense_ffn_size) beside the experts, the dense output normed
    # (post_feedforward_layernorm_1), the experts reading the residual through their own norm
    # (pre_feedforward_layernorm_2) and normed after (post_feedforward_layernorm_2), the router
    # reading it through a weightless RMSNorm times a learned [D] scale times D^-1/2 (router_norm);
    # layer_scalar: a learned scalar multiplying each layer's output. Full-attention layers may
    # differ from sliding ones (full_attention_*: head_dim, key/value heads, keys used as values,
    # their own RoPE base and scaling).
    embedding_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    attention_scale: float | None = None
    value_norm: bool = False
    sandwich_norms: bool = False
    moe_beside_dense: bool = False
    router_norm: bool = False
    layer_scalar: bool = False
    full_attention_head_dim: int | None = None
    full_attention_kv_heads: int | None = None
    full_attention_k_eq_v: bool = False
    full_attention_rope_theta: float | None = None
    full_attention_rope_scaling: dict[str, Any] | None = None
    rope_theta: float = 1e6
    # RoPE scaling (moetrt.rope: linear, dynamic, yarn, llama3 and their parameters); None: plain RoPE
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # the Hugging Face family the weights are laid out as (used when saving)
    model_type: str = "mixtral"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # hybrid linear attention (Qwen3-Next, Qwen3.5-MoE): layers whose layer_types entry is "linear_attention"
    # are Gated DeltaNet layers with linear_num_key_heads query/key heads of linear_key_head_dim and
    # linear_num_value_heads value heads of linear_value_head_dim, a causal depthwise conv of width
    # linear_conv_kernel_dim over q/k/v; they carry a conv state and a recurrent state (moetrt.state)
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    # attention output gate (Qwen3-Next): q_proj also yields a per-head gate, out *= sigmoid(gate) before o_proj
    attention_output_gate: bool = False
    # RMSNorm as x * (1 + w) (Qwen3-Next's zero-centred weights) on every norm but the DeltaNet's gated one
    rms_norm_unit_offset: bool = False
    # ERNIE-4.5-MoE: with normalize_topk the k weights are divided by max(their sum, norm_min) (moe_norm_min;
    # TopKRouting's norm_min, version 3; 0: the plain sum); biases on the dense MLPs' and shared experts'
    # projections (mlp_bias) and on lm_head (lm_head_bias), as ERNIE's use_bias puts them
    norm_min: float = 0.0
    mlp_bias: bool = False
    lm_head_bias: bool = False
    # Granite-MoE: each sublayer's output times residual_multiplier before the residual add, and the
    # logits divided by logits_scaling (its embedding_multiplier and attention_multiplier are the
    # embedding_multiplier and attention_scale above)
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # DBRX: with normalize_topk, the k weights are divided by their normalize_topk_p-norm (1: their sum,
    # as every other family; 2: their Euclidean norm): TopKRouting's normalize attribute (0, 1 or 2)
    normalize_topk_p: int = 1
    # DBRX: LayerNorm (mean-centred, a weight and no bias, eps rms_norm_eps) in place of RMSNorm on the
    # layers' input and post-attention norms and the final norm
    layer_norm: bool = False
    # Llama 4: the routing weight scales each routed expert's input instead of its output
    # (SparseMoE weight_input=1); chunked_attention layers attend within chunks of attention_chunk_size
    # positions (counted from a row's first real token); nope_layers use no RoPE, and there, with
    # attn_temperature_tuning, the queries are scaled by 1 + attn_scale * log1p(floor((p + 1) / floor_scale))
    # at cache position p
    expert_input_weighting: bool = False
    attention_chunk_size: int | None = None
    nope_layers: tuple[int, ...] = ()
    attn_temperature_tuning: bool = False
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    # PhiMoE: sparsemixer routing's jitter eps (TopKRouting's jitter_eps; scoring "sparsemixer" only); its norms
    # are LayerNorm (layer_norm above) with a bias (layer_norm_bias); it uses lm_head_bias above
    sparsemixer_jitter_eps: float = 0.01
    layer_norm_bias: bool = False

    def __post_init__(self) -> None:
        self.mlp_only_layers = tuple(int(i) for i in self.mlp_only_layers)
        self.nope_layers = tuple(int(i) for i in self.nope_layers)
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "num_experts_per_tok", "intermediate_size",
            "decoder_sparse_step", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MoEConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.kv_lora_rank is not None:
            self._check_mla()
        else:
            stray = [n for n in ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if getattr(self, n) is not None]
            if stray:
                raise ValueError(
                    f"MoEConfig.{stray[0]} is set but kv_lora_rank is None; latent attention needs kv_lora_rank "
                    "(or leave the latent-attention fields None)"
                )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"MoEConfig.hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.latent_attention and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"MoEConfig.head_dim must be an even integer >= 2 (RoPE), got {self.head_dim!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"MoEConfig.num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        if self.rotary_dim is not None and not (
            isinstance(self.rotary_dim, int) and 2 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0
        ):
            raise ValueError(
                f"MoEConfig.rotary_dim must be None (the whole head) or an even integer in 2..head_dim "
                f"({self.head_dim}), got {self.rotary_dim!r}"
            )
        self._check_groups()
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoEConfig.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MoEConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError("MoEConfig.shared_expert_intermediate_size must be >= 0 (0: no shared expert)")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"MoEConfig.mlp_only_layers has layer indices outside 0..{self.num_hidden_layers - 1}: {bad}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"MoEConfig.sliding_window must be None or >= 1, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"MoEConfig.layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers "
                    "(num_hidden_layers); give one per layer"
                )
            bad_types = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
            if bad_types:
                raise ValueError(f"MoEConfig.layer_types must hold only {LAYER_TYPES}, got {bad_types}")
            if "linear_attention" in self.layer_types:
                self._check_linear_attention()
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("MoEConfig.layer_types has sliding_attention layers but sliding_window is None")
        if self.activation == "clamped_swiglu" and not (self.swiglu_limit > 0 and self.swiglu_alpha > 0):
            raise ValueError(
                f"MoEConfig.swiglu_limit and swiglu_alpha must be > 0, got {self.swiglu_limit!r}, {self.swiglu_alpha!r}"
            )
        if self.rope_scaling is not None:
            from moetrt.rope import canonical_rope_scaling

            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"MoEConfig.rope_scaling must be None or a dict with a rope_type, got {self.rope_scaling!r}")
            # every parameter checked, transformers' defaults filled in: one config, one spelling
            self.rope_scaling = canonical_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ValueError(f"MoEConfig.clip_qkv must be None or > 0, got {self.clip_qkv!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"MoEConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"MoEConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not 0 < self.routed_scaling_factor < float("inf"):
            raise ValueError(
                f"MoEConfig.routed_scaling_factor must be a finite number > 0, got {self.routed_scaling_factor!r}"
            )
        if self.dense_intermediate_size is not None and (
            not isinstance(self.dense_intermediate_size, int) or self.dense_intermediate_size < 1
        ):
            raise ValueError(
                "MoEConfig.dense_intermediate_size must be None (use intermediate_size) or a positive integer, "
                f"got {self.dense_intermediate_size!r}"
            )
        self._check_gemma()
        if not (isinstance(self.norm_min, (int, float)) and not isinstance(self.norm_min, bool)
                and 0 <= self.norm_min < float("inf")):
            raise ValueError(f"MoEConfig.norm_min must be a finite number >= 0 (0: divide by the plain sum), "
                             f"got {self.norm_min!r}")
        self._check_granite_dbrx()
        self._check_llama4()
        self._check_sparsemixer()
        if not any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            raise ValueError(
                "MoEConfig describes no MoE layer (every layer is dense through mlp_only_layers/"
                "decoder_sparse_step); moetrt is for Mixture-of-Experts models"
            )

    def _check_mla(self) -> None:
        names = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in names + ("q_lora_rank",) * (self.q_lora_rank is not None):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"MoEConfig.{name} must be a positive integer with latent attention (kv_lora_rank set), got {value!r}"
                )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MoEConfig.qk_rope_head_dim must be even (RoPE), got {self.qk_rope_head_dim}")
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.head_dim not in (None, qk):
            raise ValueError(
                f"MoEConfig.head_dim ({self.head_dim}) must be qk_nope_head_dim + qk_rope_head_dim ({qk}) with "
                "latent attention; leave it None"
            )
        if self.rotary_dim not in (None, self.qk_rope_head_dim):
            raise ValueError(
                f"MoEConfig.rotary_dim ({self.rotary_dim}) must be qk_rope_head_dim ({self.qk_rope_head_dim}) with "
                "latent attention; leave it None"
            )
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"MoEConfig.num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                f"({self.num_attention_heads}) with latent attention: every head expands its own keys and values"
            )
        for name in ("qk_norm", "clip_qkv", "sliding_window", "layer_types"):
            if getattr(self, name) is not None:
                raise ValueError(f"MoEConfig.{name} is not supported with latent attention (kv_lora_rank set)")
        if self.attention_sinks:
            raise ValueError("MoEConfig.attention_sinks is not supported with latent attention (kv_lora_rank set)")
        if self.attention_output_gate:
            raise ValueError("MoEConfig.attention_output_gate is not supported with latent attention (kv_lora_rank set)")
        self.head_dim, self.rotary_dim = qk, self.qk_rope_head_dim

    def _check_gemma(self) -> None:
        if not 0 < self.embedding_multiplier < float("inf"):
            raise ValueError(f"MoEConfig.embedding_multiplier must be a finite number > 0, got {self.embedding_multiplier!r}")
        for name in ("final_logit_softcapping", "attention_scale"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise ValueError(f"MoEConfig.{name} must be None or a finite number > 0, got {value!r}")
        if self.moe_beside_dense and not self.sandwich_norms:
            raise ValueError("MoEConfig.moe_beside_dense needs sandwich_norms (Gemma 4's layer layout)")
        for name in ("full_attention_head_dim", "full_attention_kv_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"MoEConfig.{name} must be None (as the other layers) or a positive integer, got {value!r}")
        if self.full_attention_head_dim is not None and self.full_attention_head_dim % 2:
            raise ValueError(f"MoEConfig.full_attention_head_dim must be even (RoPE), got {self.full_attention_head_dim}")
        if self.num_attention_heads % self.full_kv_heads:
            raise ValueError(
                f"MoEConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"full_attention_kv_heads ({self.full_kv_heads})"
            )
        if self.full_attention_rope_theta is not None and not self.full_attention_rope_theta > 0:
            raise ValueError(f"MoEConfig.full_attention_rope_theta must be None or > 0, got {self.full_attention_rope_theta!r}")
        if self.full_attention_rope_scaling is not None:
            from moetrt.rope import canonical_rope_scaling

            self.full_attention_rope_scaling = canonical_rope_scaling(
                self.full_attention_rope_scaling, self.max_position_embeddings)
        if self.latent_attention and (self.value_norm or self.full_attention_k_eq_v or self.full_attention_head_dim
                                      or self.full_attention_kv_heads):
            raise ValueError("MoEConfig.value_norm and full_attention_* are not supported with latent attention")

    def _check_granite_dbrx(self) -> None:
        for name in ("residual_multiplier", "logits_scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"MoEConfig.{name} must be a finite number > 0 (1: none), got {value!r}")
        if self.normalize_topk_p not in (1, 2) or isinstance(self.normalize_topk_p, bool):
            raise ValueError(
                f"MoEConfig.normalize_topk_p must be 1 (divide by the sum) or 2 (the Euclidean norm), "
                f"got {self.normalize_topk_p!r}")
        if self.layer_norm and self.rms_norm_unit_offset:
            raise ValueError("MoEConfig.layer_norm and rms_norm_unit_offset exclude each other (one kind of norm)")

    def _check_llama4(self) -> None:
        if self.attention_chunk_size is not None and (
                not isinstance(self.attention_chunk_size, int) or isinstance(self.attention_chunk_size, bool)
                or self.attention_chunk_size < 1):
            raise ValueError(
                f"MoEConfig.attention_chunk_size must be None or a positive integer, got {self.attention_chunk_size!r}")
        chunked = self.layer_types is not None and "chunked_attention" in self.layer_types
        if chunked and self.attention_chunk_size is None:
            raise ValueError("MoEConfig.layer_types has chunked_attention layers but attention_chunk_size is None")
        bad = [i for i in self.nope_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"MoEConfig.nope_layers has layer indices outside 0..{self.num_hidden_layers - 1}: {bad}")
        if not 0 < self.attn_floor_scale < float("inf"):
            raise ValueError(f"MoEConfig.attn_floor_scale must be a finite number > 0, got {self.attn_floor_scale!r}")
        if self.latent_attention and (self.nope_layers or self.qk_norm == "l2"):
            raise ValueError("MoEConfig.nope_layers and qk_norm 'l2' are not supported with latent attention")

    def _check_sparsemixer(self) -> None:
        if self.layer_norm_bias and not self.layer_norm:
            raise ValueError("MoEConfig.layer_norm_bias needs layer_norm=True (it is the LayerNorm's bias)")
        if not 0.0 <= self.sparsemixer_jitter_eps < float("inf"):
            raise ValueError(
                f"MoEConfig.sparsemixer_jitter_eps must be a finite number >= 0, got {self.sparsemixer_jitter_eps!r}")
        if self.scoring != "sparsemixer":
            return
        if self.num_experts_per_tok != 2:
            raise ValueError(
                "MoEConfig.num_experts_per_tok must be 2 with scoring 'sparsemixer' (it picks two), "
                f"got {self.num_experts_per_tok}")
        if self.selection_bias or self.n_group > 1:
            raise ValueError("MoEConfig.selection_bias and n_group > 1 are not supported with scoring 'sparsemixer'")

    def _check_groups(self) -> None:
        if self.group_scoring not in GROUP_SCORINGS:
            raise ValueError(f"MoEConfig.group_scoring must be one of {GROUP_SCORINGS}, got {self.group_scoring!r}")
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer (1: no groups), got {value!r}")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be a multiple of n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
        if self.n_group > 1:
            size = self.num_experts // self.n_group
            if self.group_scoring == "top2_sum" and size < 2:
                raise ValueError(
                    f"MoEConfig.group_scoring 'top2_sum' needs groups of >= 2 experts, got {size} "
                    f"(num_experts {self.num_experts} / n_group {self.n_group})"
                )
            if self.num_experts_per_tok > self.topk_group * size:
                raise ValueError(
                    f"MoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                    f"topk_group ({self.topk_group}) groups a token may use ({self.topk_group * size})"
                )

    def _check_linear_attention(self) -> None:
        names = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel_dim")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"MoEConfig.{name} must be a positive integer with linear_attention layers, got {value!r}"
                )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"MoEConfig.linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.linear_conv_kernel_dim < 2:
            raise ValueError(f"MoEConfig.linear_conv_kernel_dim must be >= 2, got {self.linear_conv_kernel_dim}")
        if self.latent_attention:
            raise ValueError("MoEConfig.layer_types with linear_attention is not supported with latent attention")

    # --- derived -------------------------------------------------------------------------
    def is_linear_attention_layer(self, i: int) -> bool:
        """Whether layer ``i`` is a Gated DeltaNet (linear attention) layer."""
        return self.layer_types is not None and self.layer_types[i] == "linear_attention"

    @property
    def linear_conv_dim(self) -> int:
        """The channels of the DeltaNet's causal conv: queries, keys and values (2 Hk Dk + Hv Dv)."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_state_size(self) -> int:
        """The positions the conv state holds: the conv's width minus the new one."""
        return self.linear_conv_kernel_dim - 1

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention (DeepSeek's MLA): the cache holds a latent, not keys and values."""
        return self.kv_lora_rank is not None

    @property
    def rope_dim(self) -> int:
        """The dims of each head RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.latent_attention else self.head_dim

    @property
    def full_head_dim(self) -> int:
        """The head dim of full-attention layers (Gemma 4 widens them)."""
        return self.full_attention_head_dim or self.head_dim

    @property
    def full_kv_heads(self) -> int:
        """The key/value heads of full-attention layers."""
        return self.full_attention_kv_heads or self.num_key_value_heads

    def is_full_attention(self, i: int) -> bool:
        return self.layer_types is not None and self.layer_types[i] == "full_attention"

    def layer_head_dim(self, i: int) -> int:
        """Layer ``i``'s attention head dim."""
        return self.full_head_dim if self.is_full_attention(i) else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.full_kv_heads if self.is_full_attention(i) else self.num_key_value_heads

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def uses_rope(self, i: int) -> bool:
        """Whether layer ``i``'s attention rotates queries and keys (Llama 4's NoPE layers do not)."""
        return i not in self.nope_layers

    def layer_chunk(self, i: int) -> int | None:
        """The attention chunk of layer ``i`` (chunked_attention), None for other layers."""
        if self.layer_types is not None and self.layer_types[i] == "chunked_attention":
            return self.attention_chunk_size
        return None

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i``'s attention, None for full attention."""
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def dense_ffn_size(self) -> int:
        return self.dense_intermediate_size or self.intermediate_size

    # --- presets and (de)serialisation -----------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "MoEConfig":
        """A named preset (``MoEConfig.from_name("mixtral-8x7b")``), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["nope_layers"] = list(self.nope_layers)
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MoEConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, MoEConfig] = {
    # the trained model shipped with the package (moetrt/presets/tiny): byte-level BPE
    "tiny": MoEConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, intermediate_size=192,
        rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type="mixtral",
    ),
    # CPU benchmark configuration used across benchmarks/
    "bench-small": MoEConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, intermediate_size=3584,
        rope_theta=1e6, max_position_embeddings=4096, model_type="mixtral",
    ),
    "mixtral-8x7b": MoEConfig(
        vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_experts=8, num_experts_per_tok=2, intermediate_size=14336,
        rope_theta=1e6, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
        model_type="mixtral",
    ),
    "mixtral-8x22b": MoEConfig(
        vocab_size=32768, hidden_size=6144, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, num_experts=8, num_experts_per_tok=2, intermediate_size=16384,
        rope_theta=1e6, max_position_embeddings=65536, bos_token_id=1, eos_token_id=2,
        model_type="mixtral",
    ),
    "qwen1.5-moe-a2.7b": MoEConfig(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, intermediate_size=1408,
        normalize_topk=False, shared_expert_intermediate_size=5632, dense_intermediate_size=5632,
        attention_bias=True, rope_theta=1e6, max_position_embeddings=8192, rms_norm_eps=1e-6,
        model_type="qwen2_moe",
    ),
    "qwen3-30b-a3b": MoEConfig(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        intermediate_size=768, normalize_topk=True, qk_norm="head", rope_theta=1e6,
        max_position_embeddings=40960, rms_norm_eps=1e-6, model_type="qwen3_moe",
    ),
    "olmoe-1b-7b": MoEConfig(
        vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, intermediate_size=1024,
        normalize_topk=False, qk_norm="full", rope_theta=10000.0, max_position_embeddings=4096,
        eos_token_id=50279, pad_token_id=1, model_type="olmoe",
    ),
    # Grok-1 routing (softmax, top-2, no renormalisation) on Mixtral-style blocks
    "grok-1-style-small": MoEConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, intermediate_size=2048,
        normalize_topk=False, model_type="mixtral",
    ),
}
