"""One decoder-only language model for every supported family, with tensor-parallel layers.

Inputs are a flat varlen batch: ``input_ids`` (T,), ``positions`` (T,), and optionally image rows
(R, hidden) with the flat indices (R,) they replace, so image embeddings enter exactly where their
``<IMG_CONTEXT>`` tokens sit. The embedding and the LM head are replicated (only rank 0 builds the
head: only rank 0 samples); attention heads and MLP features are split over ranks.

``build_model`` allocates the parameters and buffers on the target device (uninitialised, no host
copy); ``load_weights`` then copies each one's values in place, reading only this rank's slices.
"""

from __future__ import annotations

import torch
from torch import nn

from services.common.checkpoint import SliceReader
from services.common.errors import FailedPrecondition
from services.decoder.attention.registry import AttentionBackend, AttentionMetadata
from services.decoder.models.layers import ParallelLinear, RMSNorm, Rotary, TPContext, load_whole
from services.decoder.models.registry import Family, ModelSpec, Source


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
    def __init__(self, spec: ModelSpec, tp: TPContext, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        check_tp_split(spec, tp.size)
        self.num_heads = spec.num_heads // tp.size
        self.num_kv_heads = spec.num_kv_heads // tp.size
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.backend = backend
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = ParallelLinear(
            spec.hidden_size, q_out + 2 * kv_out, spec.qkv_bias, tp, row_parallel=False, dtype=dtype
        )
        self.o_proj = ParallelLinear(q_out, spec.hidden_size, spec.o_bias, tp, row_parallel=True, dtype=dtype)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Per-head norms (Qwen3): every rank holds the whole (head_dim,) weight.
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype) if spec.qk_norm else None

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
    def __init__(self, spec: ModelSpec, tp: TPContext, dtype: torch.dtype):
        super().__init__()
        check_tp_split(spec, tp.size)
        self.local = spec.intermediate_size // tp.size
        self.gate_up_proj = ParallelLinear(
            spec.hidden_size, 2 * spec.intermediate_size, spec.mlp_bias, tp, row_parallel=False, dtype=dtype
        )
        self.down_proj = ParallelLinear(
            spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp, row_parallel=True, dtype=dtype
        )

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.local, self.local], dim=-1)  # 2 x (T, I / tp)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPContext, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, tp, backend, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = MLP(spec, tp, dtype)

    def forward(self, x, cos, sin, rotary, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def load(self, reader: SliceReader, src: dict[str, Source], layer: int) -> None:
        """This rank's shards of layer ``layer``'s weights, stored where ``src`` (canonical name ->
        ``Source``, from the family) says."""

        def biases(*names):
            found = [src[f"{n}.bias"] for n in names if f"{n}.bias" in src]
            return found or None

        a, m = self.self_attn, self.mlp
        a.qkv_proj.load(
            reader,
            [src["q_proj.weight"], src["k_proj.weight"], src["v_proj.weight"]],
            biases("q_proj", "k_proj", "v_proj"),
            what=f"layers.{layer}.qkv",
        )
        a.o_proj.load(reader, [src["o_proj.weight"]], biases("o_proj"), what=f"layers.{layer}.o_proj")
        m.gate_up_proj.load(
            reader,
            [src["gate_proj.weight"], src["up_proj.weight"]],
            biases("gate_proj", "up_proj"),
            what=f"layers.{layer}.gate_up",
        )
        m.down_proj.load(
            reader, [src["down_proj.weight"]], biases("down_proj"), what=f"layers.{layer}.down_proj"
        )
        norms = [
            (self.input_layernorm, "input_layernorm"),
            (self.post_attention_layernorm, "post_attention_layernorm"),
        ]
        if a.q_norm is not None:
            norms += [(a.q_norm, "q_norm"), (a.k_norm, "k_norm")]
        for norm, name in norms:
            load_whole(norm.weight, reader, src[f"{name}.weight"], f"layers.{layer}.{name}")


class DecoderLM(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        tp: TPContext,
        backend: AttentionBackend,
        with_lm_head: bool,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, tp, backend, dtype) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.rotary = Rotary(spec.rope.inv_freq, spec.rope.attention_scaling, spec.rope.rotary_dim)
        self.lm_head = (
            nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype) if with_lm_head else None
        )
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)

    def tie_head(self) -> None:
        """The head becomes the input embedding: one parameter, one storage."""
        self.lm_head.weight = self.embed_tokens.weight

    def load_weights(self, family: Family, lm: SliceReader, head: SliceReader | None) -> None:
        """Copy this rank's weights in place: ``lm`` reads the language model (canonical names),
        ``head`` the LM head (None where this rank has none or it is tied to the embedding)."""
        load_whole(self.embed_tokens.weight, lm, Source("embed_tokens.weight"), "embed_tokens")
        for i, layer in enumerate(self.layers):
            layer.load(lm, family.layer_sources(lm.names, i, self.spec), i)
        load_whole(self.norm.weight, lm, Source("norm.weight"), "norm")
        if head is not None and self.lm_head is not None:
            load_whole(self.lm_head.weight, head, Source("weight"), "lm_head")
        with torch.no_grad():
            self.rotary.inv_freq.copy_(self.spec.rope.inv_freq)

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


def build_model(
    spec: ModelSpec,
    tp: TPContext,
    backend: AttentionBackend,
    *,
    with_lm_head: bool,
    tie_head: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> DecoderLM:
    """The model with every parameter and buffer allocated on ``device`` (weights in ``dtype``, the
    rope's inverse frequencies in float32), uninitialised: ``load_weights`` fills them in place."""
    with torch.device("meta"):
        model = DecoderLM(spec, tp, backend, with_lm_head, dtype)
    model = model.to_empty(device=device)
    if tie_head and model.lm_head is not None:
        model.tie_head()  # after ``to_empty``, which allocates shared parameters separately
    return model.eval()
