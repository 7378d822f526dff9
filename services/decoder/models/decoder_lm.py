"""One decoder-only language model for every supported family, with tensor-parallel layers.

Inputs are a flat varlen batch: ``input_ids`` (T,), ``positions`` (T,), and optionally image rows
(R, hidden) with the flat indices (R,) they replace, so image embeddings enter exactly where their
``<IMG_CONTEXT>`` tokens sit. The embedding and the LM head are replicated (only rank 0 builds the
head: only rank 0 samples); attention heads and MLP features are split over ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from services.common.errors import FailedPrecondition
from services.decoder.attention.registry import AttentionBackend, AttentionMetadata
from services.decoder.models.layers import ParallelLinear, RMSNorm, Rotary, TPContext
from services.decoder.models.registry import Family, ModelSpec


def check_tp_split(spec: ModelSpec, tp_size: int) -> None:
    """Attention heads, KV heads and MLP features must split evenly over the tensor-parallel ranks."""
    if spec.num_heads % tp_size or spec.num_kv_heads % tp_size:
        raise FailedPrecondition(
            f"{spec.num_heads} attention heads / {spec.num_kv_heads} KV heads do not split over "
            f"tensor_parallel_size={tp_size}"
        )
    if spec.intermediate_size % tp_size:
        raise FailedPrecondition(f"intermediate_size {spec.intermediate_size} does not split over {tp_size}")


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPContext, backend: AttentionBackend):
        super().__init__()
        check_tp_split(spec, tp.size)
        self.num_heads = spec.num_heads // tp.size
        self.num_kv_heads = spec.num_kv_heads // tp.size
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.backend = backend
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = ParallelLinear(
            spec.hidden_size, q_out + 2 * kv_out, spec.qkv_bias, tp, row_parallel=False
        )
        self.o_proj = ParallelLinear(q_out, spec.hidden_size, spec.o_bias, tp, row_parallel=True)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Per-head norms (Qwen3): every rank holds the whole (head_dim,) weight.
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(self, x, cos, sin, rotary: Rotary, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)  # (T, (H + 2 Hkv) * D) on this rank
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary.apply(q, cos, sin)
        k = rotary.apply(k, cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        o = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # (T, H, D)
        return self.o_proj(o.reshape(-1, self.q_size))  # (T, H * D) -> (T, hidden)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPContext):
        super().__init__()
        check_tp_split(spec, tp.size)
        self.local = spec.intermediate_size // tp.size
        self.gate_up_proj = ParallelLinear(
            spec.hidden_size, 2 * spec.intermediate_size, spec.mlp_bias, tp, row_parallel=False
        )
        self.down_proj = ParallelLinear(
            spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp, row_parallel=True
        )

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.local, self.local], dim=-1)  # 2 x (T, I / tp)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPContext, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, tp, backend)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, tp)

    def forward(self, x, cos, sin, rotary, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def load(self, w: dict[str, torch.Tensor], layer: int) -> None:
        def biases(*names):
            found = [w[f"{n}.bias"] for n in names if f"{n}.bias" in w]
            return found or None

        a, m = self.self_attn, self.mlp
        a.qkv_proj.load(
            [w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]],
            biases("q_proj", "k_proj", "v_proj"),
            what=f"layers.{layer}.qkv",
        )
        a.o_proj.load([w["o_proj.weight"]], biases("o_proj"), what=f"layers.{layer}.o_proj")
        m.gate_up_proj.load(
            [w["gate_proj.weight"], w["up_proj.weight"]],
            biases("gate_proj", "up_proj"),
            what=f"layers.{layer}.gate_up",
        )
        m.down_proj.load([w["down_proj.weight"]], biases("down_proj"), what=f"layers.{layer}.down_proj")
        norms = [
            (self.input_layernorm, "input_layernorm"),
            (self.post_attention_layernorm, "post_attention_layernorm"),
        ]
        if a.q_norm is not None:
            norms += [(a.q_norm, "q_norm"), (a.k_norm, "k_norm")]
        for norm, name in norms:
            norm.weight.data = w[f"{name}.weight"].to(norm.weight.dtype)


class DecoderLM(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPContext, backend: AttentionBackend, with_lm_head: bool):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, tp, backend) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = Rotary(spec.rope.inv_freq, spec.rope.attention_scaling, spec.rope.rotary_dim)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False) if with_lm_head else None
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)

    def load_weights(
        self, family: Family, weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
    ) -> None:
        """``weights``: the checkpoint's language-model tensors (canonical names); ``head``: the LM head."""
        dtype = self.embed_tokens.weight.dtype
        self.embed_tokens.weight.data = weights["embed_tokens.weight"].to(dtype)
        for i, layer in enumerate(self.layers):
            layer.load(family.layer_weights(weights, i, self.spec), i)
        self.norm.weight.data = weights["norm.weight"].to(dtype)
        if self.lm_head is not None:
            if "weight" in head:
                self.lm_head.weight.data = head["weight"].to(dtype)
            elif self.spec.tie_word_embeddings or not head:
                self.lm_head.weight = self.embed_tokens.weight
        self.rotary.inv_freq = self.rotary.inv_freq.to(self.embed_tokens.weight.device)

    @torch.inference_mode()
    def forward(
        self, input_ids, positions, kv_caches, meta: AttentionMetadata, image_rows=None, image_index=None
    ):
        x = self.embed_tokens(input_ids)  # (T, hidden)
        if image_rows is not None and image_rows.numel():
            x[image_index] = image_rows.to(x.dtype)  # image rows replace their context tokens
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, self.rotary, kv_cache, meta)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (B, vocab)
