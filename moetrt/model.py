"""The reference MoE transformer in plain PyTorch: the fp32 truth every artifact is checked against.

Shape legend: B batch, S new tokens, P past tokens, T = B*S tokens, D model dim, H query heads,
G key/value heads, Hd head dim, E experts, F expert dim, K routed experts per token, V vocab.

The router is the ``moetrt::TopKRouting`` op and the experts are the ``moetrt::SparseMoE`` op,
so exporting this model emits exactly those nodes and nothing else carries MoE semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrt.config import MoEConfig
from moetrt.errors import MoetrtError
from moetrt.gated_deltanet import GatedDeltaNet
from moetrt.ops import kernels, sparse_moe, topk_routing
from moetrt.rope import RotaryEmbedding

__all__ = ["MoETransformer", "MoEOutput", "KVCache", "StaticKVCache"]

# one tuple per layer holding its state-contract entries (moetrt.state): (key, value) [B, G, P, Hd] each,
# or with latent attention (latent [B, P, R], rope_key [B, P, Dr])
KVCache = list[tuple[torch.Tensor, ...]]


# parameters (by last name part) that stay float32 whatever the model's dtype: TopKRouting takes its
# selection_bias input in float32 (its op spec; router math is fp32), and fp16 would move near-ties
FLOAT32_PARAMETERS = frozenset({"selection_bias"})


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of parameter ``name`` in a model (or an export) of ``dtype``."""
    return torch.float32 if name.rsplit(".", 1)[-1] in FLOAT32_PARAMETERS else dtype


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (through float32), as a Python float: a constant of the graph, not a tensor."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype))


def _capturing() -> bool:
    """Whether a CUDA graph is being captured (the checks, which read values on the host, are skipped then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class StaticKVCache:
    """Preallocated key/value buffers ``[B, G, C, Hd]`` per layer, written in place.

    ``C`` is the capacity in positions. A step writes its keys/values at ``cache_position`` and
    attends over all ``C`` positions under a mask, so every step of a given batch and capacity
    has the same shapes and tensor addresses: a CUDA graph captured once replays every decode
    step. Positions past the ones written are masked, never read as data.
    """

    def __init__(self, config: MoEConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str):
        if batch < 1 or capacity < 1:
            raise MoetrtError(f"StaticKVCache needs batch >= 1 and capacity >= 1, got batch {batch}, capacity {capacity}")
        if capacity > config.max_position_embeddings:
            raise MoetrtError(
                f"StaticKVCache capacity {capacity} exceeds the model's max_position_embeddings "
                f"({config.max_position_embeddings}); ask for at most that many positions"
            )
        from moetrt.dtypes import dtype_name, torch_dtype
        from moetrt.state import state_contract

        self.state = state_contract(config)
        sizes, model_dtype = self.state.size_map, dtype_name(dtype)
        # per layer, one buffer per state entry: [B, G, C, Hd] for key and value (C positions)
        self.buffers = [
            tuple(torch.zeros(e.shape(sizes, batch, capacity), dtype=torch_dtype(e.element_dtype(model_dtype)),
                              device=device) for e in entries)
            for entries in self.state.layers
        ]
        self._batch, self._capacity = batch, capacity

    @property
    def keys(self) -> list[torch.Tensor]:
        return [self._buffer(i, "key") for i in range(len(self.buffers))]

    @property
    def values(self) -> list[torch.Tensor]:
        return [self._buffer(i, "value") for i in range(len(self.buffers))]

    def _buffer(self, layer: int, name: str) -> torch.Tensor:
        return next(b for e, b in zip(self.state.entries(layer), self.buffers[layer], strict=True) if e.name == name)

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def capacity(self) -> int:
        return self._capacity

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.buffers[i]

    def load(self, past: KVCache) -> None:
        """Copy a dynamic cache (``[B, G, P, Hd]`` per entry and layer) into positions ``0..P-1``."""
        for layer, (given, buffers) in enumerate(zip(past, self.buffers, strict=True)):
            for entry, value, buf in zip(self.state.entries(layer), given, buffers, strict=True):
                if entry.grows:
                    buf.narrow(entry.concat_axis, 0, value.shape[entry.concat_axis]).copy_(value)
                else:  # fixed-size state: the whole buffer
                    buf.copy_(value)


@dataclass
class MoEOutput:
    logits: torch.Tensor  # [B, S, V]
    past_key_values: KVCache | None = None  # present keys/values, [B, G, P+S, Hd] per layer
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then each layer's output [B, S, D]
    router_logits: list[torch.Tensor] | None = None  # per MoE layer, fp32 [T, E]
    router_weights: list[torch.Tensor] | None = None  # per MoE layer, fp32 [T, K]
    router_indices: list[torch.Tensor] | None = None  # per MoE layer, int32 [T, K]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class UnitOffsetRMSNorm(RMSNorm):
    """RMSNorm with zero-centred weights: ``x * (1 + w)`` in float32 (Qwen3-Next's norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a weight, and a bias where ``bias`` (PhiMoE's norms; DBRX's have none), in the model dtype as
    ``nn.LayerNorm`` computes it."""

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def rms_norm(cfg: MoEConfig, dim: int) -> nn.Module:
    """The model's norm over ``dim``: RMSNorm ``w * x``, with ``rms_norm_unit_offset`` ``(1 + w) * x``, or with
    ``layer_norm`` a LayerNorm, without bias (DBRX) or with one where ``layer_norm_bias`` (PhiMoE)."""
    if cfg.layer_norm:
        return LayerNorm(dim, cfg.rms_norm_eps, bias=cfg.layer_norm_bias)
    return (UnitOffsetRMSNorm if cfg.rms_norm_unit_offset else RMSNorm)(dim, cfg.rms_norm_eps)


class ScalelessRMSNorm(nn.Module):
    """RMSNorm without a weight (Gemma 4's value norm and router norm), in float32."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, S, Hd]; cos/sin [B, S, R] with R <= Hd: the first R dims rotate, the rest pass (partial rotary)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos[:, None] + _rotate_half(x_rot) * sin[:, None], x_pass), dim=-1)


def _attend(q, k, v, mask, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in fp32 softmax; q [B, H, S, Dqk], k [B, H, P+S, Dqk], v [B, H, P+S, Dv]."""
    batch, _, seq, _ = q.shape
    scores = (q @ k.transpose(-1, -2)) * scale + mask  # [B, H, S, P+S]
    if sinks is not None:  # a per-head extra logit that takes probability mass and no value
        sinks = sinks.float().view(1, -1, 1, 1).expand(batch, -1, seq, 1)  # [B, H, S, 1]
        probs = torch.softmax(torch.cat((scores.float(), sinks), dim=-1), dim=-1)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v  # [B, H, S, Dv]


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int = 0):
        super().__init__()
        # full-attention layers may have their own head dim and key/value heads (Gemma 4)
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads, cfg.layer_kv_heads(layer_idx), cfg.layer_head_dim(layer_idx))
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.output_gate = cfg.attention_output_gate  # q_proj also yields a per-head gate [H, Hd]
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim * (2 if self.output_gate else 1), bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        # Gemma 4's full-attention layers use the key projection as the values too (attention_k_eq_v)
        self.k_eq_v = cfg.full_attention_k_eq_v and cfg.is_full_attention(layer_idx)
        self.v_proj = None if self.k_eq_v else nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.scale = self.head_dim**-0.5 if cfg.attention_scale is None else cfg.attention_scale
        self.v_norm = ScalelessRMSNorm(cfg.rms_norm_eps) if cfg.value_norm else None
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        self.qk_norm, self.clip_qkv = cfg.qk_norm, cfg.clip_qkv
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(self.n_heads))  # [H] one logit per head, in every softmax
        else:
            self.sinks = None
        if cfg.qk_norm == "head":
            self.q_norm = rms_norm(cfg, self.head_dim)
            self.k_norm = rms_norm(cfg, self.head_dim)
        elif cfg.qk_norm == "full":
            self.q_norm = rms_norm(cfg, q_dim)
            self.k_norm = rms_norm(cfg, kv_dim)
        # Llama 4: NoPE layers rotate nothing; the weightless q/k norm ("l2") runs on the rotating layers only,
        # after the rotation; NoPE layers may scale their queries by position (attention temperature tuning)
        self.rope = cfg.uses_rope(layer_idx)
        self.l2_norm = ScalelessRMSNorm(cfg.rms_norm_eps) if cfg.qk_norm == "l2" and self.rope else None
        tuned = cfg.attn_temperature_tuning and not self.rope
        self.temperature = (cfg.attn_floor_scale, cfg.attn_scale) if tuned else None

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None, cache_position=None):
        # past: the dynamic cache [B, G, P, Hd] x2, or with cache_position [S] the static buffers [B, G, C, Hd] x2
        batch, seq, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)  # [B, S, H*Hd (x2 with the output gate)], [B, S, G*Hd]
        v = k if self.v_proj is None else self.v_proj(x)  # [B, S, G*Hd]
        gate = None
        if self.output_gate:  # per head: Hd query dims, then Hd gate dims
            q, gate = q.view(batch, seq, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [B, S, H, Hd] x2
            q, gate = q.reshape(batch, seq, -1), gate.reshape(batch, seq, -1)  # [B, S, H*Hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(batch, seq, self.n_heads, self.head_dim)  # [B, S, H, Hd]
        k = k.view(batch, seq, self.n_kv, self.head_dim)  # [B, S, G, Hd]
        v = v.view(batch, seq, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|G, S, Hd]
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.l2_norm is not None:
            q, k = self.l2_norm(q), self.l2_norm(k)
        if self.temperature is not None:
            q = self._tuned_temperature(q, past, cache_position)
        if cache_position is not None:  # static: write in place, attend over all C positions
            past[0].index_copy_(2, cache_position, k)
            past[1].index_copy_(2, cache_position, v)
            k, v = past  # [B, G, C, Hd]
        elif past is not None:
            k = torch.cat((past[0], k), dim=2)  # [B, G, P+S, Hd]
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        groups = self.n_heads // self.n_kv
        k = k.repeat_interleave(groups, dim=1)  # [B, H, P+S, Hd]
        v = v.repeat_interleave(groups, dim=1)
        out = _attend(q, k, v, mask, self.scale, self.sinks)  # [B, H, S, Hd]
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # [B, S, H*Hd]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out), present

    def _tuned_temperature(self, q, past, cache_position):
        """q [B, H, S, Hd] times 1 + attn_scale * log1p(floor((p + 1) / floor_scale)) at cache position p (Llama 4)."""
        seq = q.shape[2]
        if cache_position is not None:
            positions = cache_position  # [S]
        else:
            start = 0 if past is None else past[0].shape[2]
            positions = torch.arange(seq, device=q.device) + start  # [S]
        floor_scale, attn_scale = self.temperature
        scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0  # [S]
        return (q * scales.view(1, 1, seq, 1)).to(q.dtype)


def latent_softmax_scale(cfg: MoEConfig) -> float:
    """DeepSeek's attention scale: head_dim^-0.5, times mscale^2 under YaRN with ``mscale_all_dim``."""
    scale = cfg.head_dim**-0.5
    scaling = cfg.rope_scaling
    if scaling and scaling["rope_type"] != "default" and scaling.get("mscale_all_dim"):
        from moetrt.rope import yarn_mscale

        mscale = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * mscale * mscale
    return scale


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): the cache is a latent, keys and values are expanded from it.

    Shapes: R kv_lora_rank, Rq q_lora_rank, N qk_nope_head_dim, Dr qk_rope_head_dim (the rotary
    part), Dv v_head_dim; a head's q.k dim is N + Dr. Projection names follow transformers.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_heads, self.nope, self.rope, self.v_dim = (
            cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        )
        self.rank, dim, qk = cfg.kv_lora_rank, cfg.hidden_size, cfg.head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # transformers' default eps for these norms
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.q_lora = cfg.q_lora_rank is not None
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=cfg.attention_out_bias)
        self.scale = latent_softmax_scale(cfg)

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None, cache_position=None):
        # past: (latent [B, P, R], rope_key [B, P, Dr]), or with cache_position [S] the static buffers [B, C, R|Dr]
        batch, seq, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)  # [B, S, H*(N+Dr)]
        q = q.view(batch, seq, self.n_heads, self.nope + self.rope).transpose(1, 2)  # [B, H, S, N+Dr]
        q_nope, q_rot = q.split((self.nope, self.rope), dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split((self.rank, self.rope), dim=-1)  # [B, S, R], [B, S, Dr]
        latent = self.kv_a_layernorm(latent)
        q_rot = apply_rope(q_rot, cos, sin)  # [B, H, S, Dr]
        k_rot = apply_rope(k_rot[:, None], cos, sin)[:, 0]  # [B, S, Dr]: one rotary key for every head
        if cache_position is not None:  # static: write in place, attend over all C positions
            past[0].index_copy_(1, cache_position, latent)
            past[1].index_copy_(1, cache_position, k_rot)
            latent, k_rot = past  # [B, C, R], [B, C, Dr]
        elif past is not None:
            latent = torch.cat((past[0], latent), dim=1)  # [B, P+S, R]
            k_rot = torch.cat((past[1], k_rot), dim=1)  # [B, P+S, Dr]
        present = (latent, k_rot)
        total = latent.shape[1]
        kv = self.kv_b_proj(latent).view(batch, total, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)  # [B, H, P+S, N], [B, H, P+S, Dv]
        k = torch.cat((k_nope, k_rot[:, None].expand(-1, self.n_heads, -1, -1)), dim=-1)  # [B, H, P+S, N+Dr]
        q = torch.cat((q_nope, q_rot), dim=-1)  # [B, H, S, N+Dr]
        out = _attend(q, k, v, mask, self.scale)  # [B, H, S, Dv]
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_dim)  # [B, S, H*Dv]
        return self.o_proj(out), present


class DenseMLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts (GeGLU with ``gelu_tanh``: Gemma 4)."""

    def __init__(self, dim: int, ffn: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=bias)
        self.up_proj = nn.Linear(dim, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, dim, bias=bias)
        self.gelu = activation == "gelu_tanh"

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts of a layer as two stacked tensors (transformers v5 layout), optional biases."""

    def __init__(self, num_experts: int, dim: int, ffn: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn, dim))  # [E, 2F, D] gate rows, then up
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn))  # [E, D, F]
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * ffn)) if bias else None  # [E, 2F]
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, dim)) if bias else None  # [E, D]


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.k, self.scoring = cfg.num_experts_per_tok, cfg.scoring
        self.weight_input = int(cfg.expert_input_weighting)  # Llama 4: the routing weight scales the experts' input
        self.expert_args = dict(weight_input=1) if self.weight_input else {}  # SparseMoE's, only where set
        self.normalize, self.scale = cfg.normalize_topk, cfg.routed_scaling_factor
        if cfg.normalize_topk and cfg.normalize_topk_p != 1:  # TopKRouting's normalize is the p of the norm (DBRX: 2)
            self.normalize = cfg.normalize_topk_p
        self.activation = cfg.activation
        # the clamped SwiGLU's constants (SparseMoE attributes); silu takes none
        self.act_args = dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit) if cfg.activation != "silu" else {}
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)  # router
        # Gemma 4: the router reads a weightless RMSNorm of its input times a learned [D] scale times D^-1/2
        self.router_norm = ScalelessRMSNorm(cfg.rms_norm_eps) if cfg.router_norm else None
        self.router_scale = nn.Parameter(torch.ones(cfg.hidden_size)) if cfg.router_norm else None  # [D]
        self.router_root = cfg.hidden_size**-0.5
        # DeepSeek-V3 routing (TopKRouting version 2): a bias [E] on the scores that only chooses, and groups
        self.selection_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False) if cfg.selection_bias else None
        self.route_args = {}
        if cfg.n_group > 1:
            self.route_args = dict(n_group=cfg.n_group, topk_group=cfg.topk_group, group_scoring=cfg.group_scoring)
        if cfg.norm_min and cfg.normalize_topk:  # ERNIE-4.5: the renormalisation's denominator clamped (version 3)
            self.route_args["norm_min"] = cfg.norm_min
        if cfg.scoring == "sparsemixer":  # PhiMoE: its masks' jitter eps (version 4)
            self.route_args["jitter_eps"] = cfg.sparsemixer_jitter_eps
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.expert_bias)
        self.shared_expert = None
        self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, bias=cfg.mlp_bias)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def _apply(self, fn, recurse=True):
        # the selection bias stays float32 when the model moves to fp16/bf16 (FLOAT32_PARAMETERS)
        kept = None if self.selection_bias is None else self.selection_bias.data
        super()._apply(fn, recurse)
        if kept is not None and self.selection_bias.dtype != torch.float32:
            device = self.selection_bias.device
            self.selection_bias.data = (torch.empty(kept.shape, dtype=torch.float32, device=device) if kept.is_meta
                                        else kept.to(device=device, dtype=torch.float32))
        return self

    def forward(self, x: torch.Tensor, router_input: torch.Tensor | None = None):
        # router_input [B, S, D]: what the router reads where it is not x (Gemma 4: the residual stream)
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)  # [T, D]
        routed = tokens if router_input is None else router_input.reshape(-1, dim)  # [T, D]
        if self.router_norm is not None:
            routed = self.router_norm(routed) * self.router_scale * self.router_root  # [T, D]
        router_logits = kernels.router_logits(routed, self.gate.weight, self.gate.bias)  # [T, E], fp32 in every dtype
        if self.selection_bias is None and not self.route_args:  # the version-1 call, as exported before
            weights, indices = topk_routing(router_logits, self.k, self.scoring, self.normalize, self.scale)  # [T, K] x2
        else:
            weights, indices = topk_routing(
                router_logits, self.k, self.scoring, self.normalize, self.scale,
                selection_bias=self.selection_bias, **self.route_args,
            )  # [T, K] x2
        experts = self.experts
        if getattr(experts, "fp8", False):  # FP8 experts (moetrt.fp8.FP8Experts): the torch back end's expert_precision
            y = experts(tokens, weights, indices, self.activation)  # [T, D]
        elif experts.gate_up_proj_bias is None and self.activation == "silu" and not self.weight_input:
            y = sparse_moe(tokens, weights, indices, experts.gate_up_proj, experts.down_proj)  # [T, D], the plain call
        else:
            y = sparse_moe(
                tokens, weights, indices, experts.gate_up_proj, experts.down_proj, experts.gate_up_proj_bias,
                experts.down_proj_bias, activation=self.activation, **self.act_args, **self.expert_args,
            )  # [T, D]
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)  # [T, D]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            y = y + shared
        return y.view(batch, seq, dim), (router_logits, weights, indices)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = rms_norm(cfg, cfg.hidden_size)
        self.linear = cfg.is_linear_attention_layer(layer_idx)
        if self.linear:  # a Gated DeltaNet in place of attention (transformers names it linear_attn)
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = LatentAttention(cfg) if cfg.latent_attention else Attention(cfg, layer_idx)
        self.post_attention_layernorm = rms_norm(cfg, cfg.hidden_size)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = (MoEBlock(cfg) if self.is_moe
                    else DenseMLP(cfg.hidden_size, cfg.dense_ffn_size, cfg.activation, bias=cfg.mlp_bias))
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma 4: post_attention_layernorm norms the attention output; these the feed-forward's
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.beside = cfg.moe_beside_dense and self.is_moe
        if self.beside:  # a dense MLP beside the experts, each with its own norms
            self.dense_mlp = DenseMLP(cfg.hidden_size, cfg.dense_ffn_size, cfg.activation)
            self.post_feedforward_layernorm_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layer_scalar = nn.Parameter(torch.ones(1)) if cfg.layer_scalar else None  # [1]
        self.residual_multiplier = cfg.residual_multiplier  # Granite-MoE: each sublayer's output times it

    def _residual(self, out: torch.Tensor) -> torch.Tensor:
        """A sublayer's output as the residual stream adds it (times residual_multiplier where it is not 1)."""
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def _sandwich_forward(self, x, cos, sin, mask, past, cache_position):
        """Gemma 4's layer: normed attention output; the dense MLP and the experts side by side, each normed."""
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, cache_position)
        x = x + self.post_attention_layernorm(attn)
        router = None
        if self.beside:
            dense = self.post_feedforward_layernorm_1(self.dense_mlp(self.pre_feedforward_layernorm(x)))
            moe, router = self.mlp(self.pre_feedforward_layernorm_2(x), router_input=x)  # [B, S, D]
            ffn = dense + self.post_feedforward_layernorm_2(moe)
        elif self.is_moe:
            ffn, router = self.mlp(self.pre_feedforward_layernorm(x))
        else:
            ffn = self.mlp(self.pre_feedforward_layernorm(x))
        x = x + self.post_feedforward_layernorm(ffn)
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x, present, router

    def forward(self, x, cos, sin, mask, past, cache_position=None, padding=None):
        # padding [B, S] (1 = real token) or None: what a linear-attention layer masks out of its states
        if self.sandwich:
            return self._sandwich_forward(x, cos, sin, mask, past, cache_position)
        if self.linear:
            attn, present = self.linear_attn(self.input_layernorm(x), padding, past)
            if cache_position is not None:  # static buffers: the fixed-size states are replaced in place
                for buf, new in zip(past, present, strict=True):
                    buf.copy_(new)
                present = past
        else:
            attn, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, cache_position)
        x = x + self._residual(attn)
        if self.is_moe:
            ffn, router = self.mlp(self.post_attention_layernorm(x))
        else:
            ffn, router = self.mlp(self.post_attention_layernorm(x)), None
        return x + self._residual(ffn), present, router


def rotary_embedding(cfg: MoEConfig) -> RotaryEmbedding:
    """The model's RoPE (its buffers are derived from the config, never loaded)."""
    if cfg.rope_scaling is None:
        return RotaryEmbedding(cfg.rope_dim, cfg.rope_theta)
    return RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)


def full_rotary_embedding(cfg: MoEConfig) -> RotaryEmbedding | None:
    """The RoPE of full-attention layers where it differs from the others' (Gemma 4), else None."""
    if cfg.full_attention_rope_theta is None and cfg.full_attention_rope_scaling is None:
        return None
    return RotaryEmbedding(cfg.full_head_dim, cfg.full_attention_rope_theta or cfg.rope_theta,
                           cfg.full_attention_rope_scaling, cfg.max_position_embeddings)


class MoETransformer(nn.Module):
    """Decoder-only MoE transformer; ``model(input_ids, ...)`` returns a :class:`MoEOutput`."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary_embedding(config)
        # Gemma 4: full-attention layers rotate with their own base and scaling over their own head dim
        self.rotary_full = full_rotary_embedding(config)
        from moetrt.state import state_contract

        self.state = state_contract(config)  # what each layer carries between steps

    @classmethod
    def from_config(cls, config: MoEConfig, seed: int | None = 0, std: float = 0.02) -> "MoETransformer":
        """A randomly initialised model (normal(0, std) weights, unit norms), seeded for reproducibility."""
        model = cls(config)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    unit_offset = config.rms_norm_unit_offset and not name.endswith("linear_attn.norm.weight")
                    param.fill_(0.0 if unit_offset else 1.0)  # a norm that starts as the identity's scale
                elif name.endswith(("router_scale", "layer_scalar")):
                    param.fill_(1.0)
                elif name.endswith("norm.bias"):  # LayerNorm's bias (PhiMoE) starts at zero
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=generator)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _mask(self, attention_mask, batch, seq, past, dtype, device, cache_position=None, total=None,
              window: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Additive mask [B, 1, S, P+S] (static cache: [B, 1, S, C]): causal over cache positions, padding, sliding
        window, attention chunk (positions counted from each row's first real token, as transformers)."""
        if cache_position is None:
            total = past + seq
            q_pos = torch.arange(seq, device=device)[:, None] + past  # [S, 1]
        else:
            q_pos = cache_position[:, None]  # [S, 1]
        k_pos = torch.arange(total, device=device)[None, :]  # [1, P+S] or [1, C]
        allowed = k_pos <= q_pos  # [S, P+S]
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        allowed = allowed[None, None]  # [1, 1, S, P+S]
        if chunk is not None:
            if attention_mask is None:
                allowed = allowed & ((k_pos // chunk) == (q_pos // chunk))[None, None]
            else:  # chunks start at each row's first real token: shift by its left padding
                left = (attention_mask.cumsum(-1) == 0).sum(-1)[:, None, None, None]  # [B, 1, 1, 1]
                k_chunk = (k_pos[None, None] - left).clamp(min=0) // chunk  # [B, 1, 1, P+S]
                q_chunk = (q_pos[None, None] - left).clamp(min=0) // chunk  # [B, 1, S, 1]
                allowed = allowed & (k_chunk == q_chunk)  # [B, 1, S, P+S]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()  # [B, 1, S, P+S]
        zero = torch.zeros((), dtype=dtype, device=device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(allowed, zero, neg).expand(batch, 1, seq, total)

    def _mask_kind(self, i: int) -> tuple[int | None, int | None]:
        """(sliding window, attention chunk) of layer ``i``'s mask."""
        return self.config.layer_window(i), self.config.layer_chunk(i)

    def _past_length(self, past_key_values: KVCache | None) -> int:
        """The positions a dynamic cache holds, read along its first growing entry (state contract)."""
        if not past_key_values:
            return 0
        for layer, entries in enumerate(self.state.layers):  # linear-attention layers carry fixed-size state only
            for i, e in enumerate(entries):
                if e.grows:
                    return past_key_values[layer][i].shape[e.concat_axis]
        return 0

    def _validate(self, input_ids, attention_mask, position_ids, past_key_values, past, static_cache=None) -> None:
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise MoetrtError(
                f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        batch, seq = input_ids.shape
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise MoetrtError(
                f"token ids must lie in 0..{cfg.vocab_size - 1} (the vocabulary), got "
                f"{int(input_ids.min())}..{int(input_ids.max())}; check the tokenizer matches the model"
            )
        if static_cache is not None:
            self._validate_static(batch, seq, attention_mask, past_key_values, static_cache)
        elif attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise MoetrtError(
                f"attention_mask must be [batch, past + seq] = [{batch}, {past + seq}], got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None and tuple(position_ids.shape) != (batch, seq):
            raise MoetrtError(f"position_ids must be [batch, seq] = [{batch}, {seq}], got {tuple(position_ids.shape)}")
        if past + seq > cfg.max_position_embeddings:
            raise MoetrtError(
                f"{past + seq} positions exceed the model's maximum of {cfg.max_position_embeddings} "
                f"(max_position_embeddings); shorten the prompt or max_new_tokens"
            )
        if past_key_values is not None and len(past_key_values) != cfg.num_hidden_layers:
            raise MoetrtError(
                f"past_key_values must hold one tuple of state ({', '.join(e.name for e in self.state.entries(0))}) per layer "
                f"({cfg.num_hidden_layers}), "
                f"got {len(past_key_values)}"
            )
        if past_key_values is not None:
            self._validate_fixed_state(past_key_values, batch)

    def _validate_fixed_state(self, past_key_values: KVCache, batch: int) -> None:
        """Fixed-size state (a linear-attention layer's conv and recurrent state) must have its one shape."""
        for i, (entries, tensors) in enumerate(zip(self.state.layers, past_key_values, strict=True)):
            for entry, tensor in zip(entries, tensors):
                want = self.state.shape(i, entry, batch, 0)
                if not entry.grows and tuple(tensor.shape) != want:
                    raise MoetrtError(
                        f"past_key_values[{i}] {entry.name} must be {list(want)} ({', '.join(map(str, entry.dims))}), "
                        f"got {list(tensor.shape)}; pass the state the previous step returned (zeros before a prefill)"
                    )

    def _validate_static(self, batch, seq, attention_mask, past_key_values, cache: StaticKVCache) -> None:
        if past_key_values is not None:
            raise MoetrtError("pass either past_key_values (a dynamic cache) or static_cache, not both")
        if cache.batch != batch or len(cache.buffers) != self.config.num_hidden_layers:
            raise MoetrtError(
                f"static_cache holds batch {cache.batch} and {len(cache.buffers)} layers; this model and input need "
                f"batch {batch} and {self.config.num_hidden_layers} layers: build it with StaticKVCache(config, {batch}, ...)"
            )
        if seq > cache.capacity:
            raise MoetrtError(f"{seq} new positions exceed the static cache's capacity of {cache.capacity}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, cache.capacity):
            raise MoetrtError(
                f"with a static cache, attention_mask must be [batch, capacity] = [{batch}, {cache.capacity}] "
                f"(1 = a real token written in the cache), got {tuple(attention_mask.shape)}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = True,
        output_hidden_states: bool = False,
        output_router: bool = False,
        static_cache: StaticKVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> MoEOutput:
        # input_ids [B, S]; attention_mask [B, P+S] (1 = real token); position_ids [B, S]
        # With static_cache: cache_position int64 [S] says where this step's keys/values go (all rows
        # alike), attention_mask is [B, C] over the whole capacity, and the returned past_key_values
        # are the cache's own buffers [B, G, C, Hd]. Nothing syncs with the host (a CUDA graph can
        # capture a step) when the checks are skipped, i.e. while a CUDA graph is being captured.
        batch, seq = input_ids.shape
        static = static_cache is not None
        if static:
            if cache_position is None:
                raise MoetrtError("static_cache needs cache_position: the int64 positions [S] this step writes")
            past = 0  # unknown on the host; positions come from cache_position
        else:
            past = self._past_length(past_key_values)
        if not torch.compiler.is_compiling() and not _capturing():
            self._validate(input_ids, attention_mask, position_ids, past_key_values, past, static_cache)
            if static and (int(cache_position.min()) < 0 or int(cache_position.max()) >= static_cache.capacity):
                raise MoetrtError(
                    f"cache_position must lie in 0..{static_cache.capacity - 1} (the static cache's capacity), got "
                    f"{int(cache_position.min())}..{int(cache_position.max())}"
                )
        if position_ids is None:
            if static:
                position_ids = cache_position[None].expand(batch, seq)
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device)[None].expand(batch, seq)
        x = self.embed_tokens(input_ids)  # [B, S, D]
        if self.config.embedding_multiplier != 1.0:  # the multiplier rounded to the model dtype, as transformers
            x = x * _in_dtype(self.config.embedding_multiplier, x.dtype)
        cos, sin = self.rotary(position_ids, x.dtype)  # [B, S, Hd] x2
        rope_full = None if self.rotary_full is None else self.rotary_full(position_ids, x.dtype)
        masks = {}  # one per (sliding window, attention chunk) in use (None, None: full attention)
        for window, chunk in dict.fromkeys(self._mask_kind(i) for i in range(len(self.layers))):
            if static:
                masks[window, chunk] = self._mask(
                    attention_mask, batch, seq, 0, x.dtype, x.device, cache_position, static_cache.capacity, window,
                    chunk,
                )  # [B, 1, S, C]
            else:
                masks[window, chunk] = self._mask(
                    attention_mask, batch, seq, past, x.dtype, x.device, window=window, chunk=chunk
                )  # [B, 1, S, P+S]
        presents: KVCache = []
        rope = (cos, sin)
        hidden = [x] if output_hidden_states else None
        routers = []
        padding = None  # [B, S]: which new positions are real tokens, for linear-attention layers
        if attention_mask is not None and any(layer.linear for layer in self.layers):
            padding = (attention_mask.index_select(1, cache_position) if static
                       else attention_mask[:, attention_mask.shape[1] - seq:]).to(x.dtype)
        for i, layer in enumerate(self.layers):
            mask = masks[self._mask_kind(i)]
            cos, sin = rope_full if rope_full is not None and self.config.is_full_attention(i) else rope
            if static:
                x, present, router = layer(x, cos, sin, mask, static_cache.layer(i), cache_position, padding)
            else:
                x, present, router = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None,
                                           padding=padding)
            presents.append(present)
            if router is not None:
                routers.append(router)
            if hidden is not None:
                hidden.append(x)
        logits = self.lm_head(self.norm(x))  # [B, S, V]
        if self.config.logits_scaling != 1.0:  # Granite-MoE divides its logits
            logits = logits / self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        out = MoEOutput(logits=logits, past_key_values=presents if use_cache else None, hidden_states=hidden)
        if output_router:
            out.router_logits = [r[0] for r in routers]
            out.router_weights = [r[1] for r in routers]
            out.router_indices = [r[2] for r in routers]
        return out
