"""An in-test implementation of the original InternVL chat modules, under the original key names.

Written from the reference's behaviour (``modeling_intern_vit.py``, ``modeling_internlm2.py``,
``modeling_internvl_chat.py``, ``conversation.py``): InternViT with fused qkv, layer scale, optional
RMSNorm and qk-norm; the v1/v2 pixel shuffle; ``mlp1``; InternLM2 with the fused, per-group ``wqkv``;
and ``chat()``'s prompt construction. The converter's output is checked against this, so it shares
no code with ``services.convert``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# -- InternViT --------------------------------------------------------------------------------


@dataclass
class VitConfig:
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 64
    image_size: int = 56
    patch_size: int = 14
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6

    def to_original(self) -> dict:
        return {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": 3,
            "qkv_bias": self.qkv_bias,
            "qk_normalization": self.qk_normalization,
            "norm_type": self.norm_type,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": "gelu",
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 0.1,
            "use_flash_attn": False,
        }


def _norm(cfg: VitConfig, dim: int):
    return (
        RMSNorm(dim, cfg.layer_norm_eps)
        if cfg.norm_type == "rms_norm"
        else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
    )


class VitEmbeddings(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, c))

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class VitAttention(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.proj = nn.Linear(c, c)
        self.qk_norm = cfg.qk_normalization
        if self.qk_norm:
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps)

    def forward(self, x):
        b, n, c = x.shape
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv.unbind(0)
        if self.qk_norm:
            q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(b, n, self.heads, d).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(-2, -1)).view(b, n, self.heads, d).transpose(1, 2)
        attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class VitMLP(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VitLayer(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.attn = VitAttention(cfg)
        self.mlp = VitMLP(cfg)
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.ls1 = nn.Parameter(torch.randn(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.randn(cfg.hidden_size))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VitEncoder(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.layers = nn.ModuleList([VitLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class InternViT(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.embeddings = VitEmbeddings(cfg)
        self.encoder = VitEncoder(cfg)

    def forward(self, pixel_values, select_layer: int = -1):
        hidden = [self.embeddings(pixel_values)]
        for layer in self.encoder.layers:
            hidden.append(layer(hidden[-1]))
        return hidden[select_layer]


def pixel_shuffle(x, scale: float, ps_version: str):
    """The reference's pixel shuffle; v1 skips the final transpose."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


# -- InternLM2 --------------------------------------------------------------------------------


@dataclass
class InternLM2Config:
    vocab_size: int
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    bias: bool = False
    max_position_embeddings: int = 256

    def to_original(self) -> dict:
        return {
            "architectures": ["InternLM2ForCausalLM"],
            "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "model_type": "internlm2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "bias": self.bias,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": 2,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "attn_implementation": "eager",
            "torch_dtype": "float32",
        }


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class LM2Attention(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.cfg = cfg
        self.d = cfg.hidden_size // cfg.num_attention_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * self.d
        self.wqkv = nn.Linear(cfg.hidden_size, rows, bias=cfg.bias)
        self.wo = nn.Linear(cfg.num_attention_heads * self.d, cfg.hidden_size, bias=cfg.bias)

    def rope(self, n: int):
        cfg, d = self.cfg, self.d
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
        t = torch.arange(n).float()
        if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
            t = t / cfg.rope_scaling["factor"]
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x):
        b, n, _ = x.shape
        kv, g, d = self.cfg.num_key_value_heads, self.groups, self.d
        qkv = self.wqkv(x).reshape(b, n, kv, g + 2, d)  # 'b q (h gs d) -> b q h gs d'
        q = qkv[..., :g, :].reshape(b, n, kv * g, d).transpose(1, 2)  # (B, H, N, D)
        k = qkv[..., -2, :].transpose(1, 2)  # (B, KV, N, D)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = self.rope(n)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        mask = torch.full((n, n), float("-inf")).triu(1)
        out = (scores + mask).softmax(-1) @ v  # (B, H, N, D)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class LM2FeedForward(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LM2Layer(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.attention = LM2Attention(cfg)
        self.feed_forward = LM2FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class LM2Model(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LM2Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg: InternLM2Config):
        super().__init__()
        self.model = LM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def logits(self, inputs_embeds):
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x)
        return self.output(self.model.norm(x))


class HFCausalLM(nn.Module):
    """Wraps a transformers causal LM (Qwen2, Phi-3) as the original ``InternVLChatModel`` holds it."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def logits(self, inputs_embeds):
        return self.inner(inputs_embeds=inputs_embeds, use_cache=False).logits


# -- InternVLChatModel ---------------------------------------------------------------------------


class InternVLChat(nn.Module):
    def __init__(
        self, vit: VitConfig, language_model: nn.Module, llm_hidden: int, ps_version: str, select_layer=-1
    ):
        super().__init__()
        self.vision_model = InternViT(vit)
        c4 = vit.hidden_size * 4
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(c4), nn.Linear(c4, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )
        self.language_model = language_model
        self.ps_version = ps_version
        self.select_layer = select_layer

    def state_dict_original(self) -> dict[str, torch.Tensor]:
        """Keys as the original checkpoint stores them (an HF LLM sits directly under language_model.)."""
        out = {}
        for k, v in self.state_dict().items():
            out[k.replace("language_model.inner.", "language_model.")] = v.detach().clone().contiguous()
        return out

    @torch.no_grad()
    def extract_feature(self, pixel_values):
        x = self.vision_model(pixel_values, self.select_layer)[:, 1:, :]
        h = w = int(x.shape[1] ** 0.5)
        x = pixel_shuffle(x.reshape(x.shape[0], h, w, -1), 0.5, self.ps_version)
        return self.mlp1(x.reshape(x.shape[0], -1, x.shape[-1]))  # (tiles, tokens, D)

    @torch.no_grad()
    def greedy(
        self, input_ids: list[int], pixel_values, image_token_id: int, max_new_tokens: int
    ) -> list[int]:
        """Greedy decoding without a cache: every step recomputes the whole sequence."""
        ids = list(input_ids)
        features = self.extract_feature(pixel_values).reshape(-1, self.mlp1[-1].out_features)
        out = []
        for _ in range(max_new_tokens):
            t = torch.tensor([ids])
            embeds = self.language_model.get_input_embeddings()(t).clone()
            sel = t[0] == image_token_id
            embeds[0, sel] = features.to(embeds.dtype)
            nxt = int(self.language_model.logits(embeds)[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
        return out


# -- chat() prompt ------------------------------------------------------------------------------

REFERENCE_TEMPLATES = {
    # name: (system_template, roles, sep) as conversation.py registers them (MPT style).
    "Hermes-2": (
        "<|im_start|>system\n{system_message}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    "internlm2-chat": (
        "<|im_start|>system\n{system_message}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    "phi3-chat": ("<|system|>\n{system_message}", ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
    "internvl2_5": (
        "<|im_start|>system\n{system_message}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>\n",
    ),
}


def reference_chat_prompt(
    template: str, system_message: str, question: str, history=None, num_images: int = 0
) -> str:
    """The query string ``chat()`` builds before replacing ``<image>`` placeholders."""
    system_template, roles, sep = REFERENCE_TEMPLATES[template]
    if history is None and num_images and "<image>" not in question:
        question = "<image>\n" + question
    messages = []
    for old_q, old_a in history or []:
        messages += [(roles[0], old_q), (roles[1], old_a)]
    messages += [(roles[0], question), (roles[1], None)]
    ret = system_template.format(system_message=system_message) + sep
    for role, message in messages:
        ret += role + message + sep if message else role
    return ret


def expand_images(query: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """chat()'s expansion of each ``<image>``; a converted template's ``<IMG_CONTEXT>`` placeholder
    (the -hf convention the mesh's decoder expands) is expanded the same way."""
    pieces = re.split(r"(<image>|<IMG_CONTEXT>)", query)
    out, k = [], 0
    for piece in pieces:
        if piece in ("<image>", "<IMG_CONTEXT>") and k < len(tiles_per_image):
            out.append("<img>" + "<IMG_CONTEXT>" * tokens_per_tile * tiles_per_image[k] + "</img>")
            k += 1
        else:
            out.append(piece)
    return "".join(out)


def as_rendered(reference_prompt: str) -> str:
    """The reference ``chat()`` prompt with ``<image>`` written as converted templates write it."""
    return reference_prompt.replace("<image>", "<IMG_CONTEXT>")
