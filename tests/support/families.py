"""The InternVL family as the README lists it, one entry per model: every ``config.json`` value that
changes behaviour as the released checkpoint has it, with the widths scaled down.

Exact: rope type and parameters, ``max_position_embeddings`` (and Phi-3's
``original_max_position_embeddings``), vocabulary size and special-token ids, norm types and eps,
qk-norm, biases, tied embeddings, the query / key-value head ratio (and head_dim where it differs
from hidden / heads, as in Qwen3, or sizes the rope, as Phi-3's 48 longrope factors), ``ps_version``,
``downsample_ratio``, ``template``, ``select_layer``, the tiling keys and the vision tower's kind
(InternViT-6B: RMSNorm, qk-norm, no qkv bias; InternViT-300M: LayerNorm, qkv bias).
Scaled: hidden and intermediate sizes, head counts (keeping the ratio) and layers (2 per tower), so a
checkpoint builds in seconds (``tests/support/family_checkpoints.py``) while its embedding keeps the
real vocabulary.

Where the numbers come from: the public ``config.json`` of each model on its model card
(OpenGVLab/<name>) and of its language model (internlm/*, Qwen/*, microsoft/Phi-3-mini-128k-instruct).
Nothing is downloaded here; the values are written from those files as published, and a comment says
so where a value is not certain. The InternVL2-8B / 26B and InternVL3-1B values were checked against
copies of their ``config.json`` quoted in public code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# -- vision towers ---------------------------------------------------------------------------------

_VIT_COMMON = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_act": "gelu",
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "layer_norm_eps": 1e-06,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "drop_path_rate": 0.0,
    "use_flash_attn": True,  # a runtime switch of the remote code; the converter drops it
}

# InternViT-6B-448px-V1-5 (InternVL-Chat-V1-5, InternVL2-26B): real 3200 wide, 25 heads (head_dim 128),
# 12800 intermediate, 45 layers. Values from InternVL2-26B's config.json.
VIT_6B = {
    **_VIT_COMMON,
    "hidden_size": 64,  # real 3200
    "intermediate_size": 256,  # real 12800 (4x)
    "num_attention_heads": 2,  # real 25
    "num_hidden_layers": 2,  # real 45
    "norm_type": "rms_norm",
    "qk_normalization": True,
    "qkv_bias": False,
    "initializer_factor": 0.1,
    "initializer_range": 1e-10,
}

# InternViT-300M-448px (and -V2_5): real 1024 wide, 16 heads, 4096 intermediate, 24 layers. Values from
# InternVL2-8B's and InternVL3-1B's config.json (the V2_5 tower has the same config).
VIT_300M = {
    **_VIT_COMMON,
    "hidden_size": 64,  # real 1024
    "intermediate_size": 256,  # real 4096 (4x)
    "num_attention_heads": 4,  # real 16
    "num_hidden_layers": 2,  # real 24
    "norm_type": "layer_norm",
    "qk_normalization": False,
    "qkv_bias": True,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}

# -- language models -------------------------------------------------------------------------------

_INTERNLM2 = {
    "architectures": ["InternLM2ForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    "model_type": "internlm2",
    "attn_implementation": "flash_attention_2",  # runtime; dropped by the converter
    "vocab_size": 92553,  # 92544 InternLM2 pieces + the 9 InternVL tokens
    "hidden_act": "silu",
    "bias": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000,
    "max_position_embeddings": 32768,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# internlm2-chat-1_8b (Mini-InternVL-Chat-2B-V1-5, InternVL2-2B): real 2048 wide, 8192 intermediate,
# 16 heads / 8 kv heads (2:1, head_dim 128), 24 layers. rope_scaling: null as written here; not certain
# (internlm2-chat-1_8b's own config may carry dynamic NTK; below max_position_embeddings both are the
# plain rope, so the served tokens would not change).
INTERNLM2_1_8B = {
    **_INTERNLM2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rope_scaling": None,
}

# internlm2_5-7b-chat (InternVL2-8B, InternVL2_5-8B): real 4096 wide, 14336 intermediate, 32 heads / 8 kv
# heads (4:1, head_dim 128), 32 layers; dynamic NTK factor 2.0 (InternVL2-8B's config.json).
INTERNLM2_5_7B = {
    **_INTERNLM2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"},
}

# internlm2-chat-20b (InternVL-Chat-V1-5, InternVL2-26B): real 6144 wide, 16384 intermediate, 48 heads / 8
# kv heads (6:1, head_dim 128), 48 layers; dynamic NTK factor 3.0 (InternVL2-26B's config.json; V1-5 is
# taken to carry the same llm_config, same LLM; not checked).
INTERNLM2_20B = {
    **_INTERNLM2,
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_attention_heads": 6,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "rope_scaling": {"factor": 3.0, "type": "dynamic"},
}

_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 70,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# Qwen2-0.5B-Instruct (InternVL2-1B): real 896 wide, 4864 intermediate, 14 heads / 2 kv heads (7:1,
# head_dim 64), 24 layers; q/k/v biases. vocab 151655 = 151643 + 3 Qwen2 specials + 9 InternVL tokens.
# Not certain: tie_word_embeddings (Qwen2-0.5B itself ties; InternVL2-1B is taken to save lm_head
# untied, as InternVL3-1B does), rope_scaling null, max_window_layers / sliding_window (unused: the
# sliding window is off).
QWEN2_0_5B = {
    **_QWEN2,
    "vocab_size": 151655,
    "hidden_size": 112,
    "intermediate_size": 224,
    "num_attention_heads": 7,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "max_window_layers": 24,
    "sliding_window": 32768,
    "eos_token_id": 151645,
    "rope_scaling": None,
}

# Qwen2.5-0.5B-Instruct as InternVL3-1B's config.json has it (checked): vocab 151674, 896 wide, 4864
# intermediate, 14 / 2 heads (7:1), 24 layers, dynamic NTK factor 2.0, eos 151643, untied.
# InternVL2_5-1B is taken to carry the same llm_config (same LLM and recipe; its rope_scaling and eos are
# not certain).
QWEN2_5_0_5B = {
    **_QWEN2,
    "vocab_size": 151674,
    "hidden_size": 112,
    "intermediate_size": 224,
    "num_attention_heads": 7,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "eos_token_id": 151643,
    "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
}

# Qwen2.5-7B-Instruct (InternVL3-8B): real 3584 wide, 18944 intermediate, 28 heads / 4 kv heads (7:1,
# head_dim 128), 28 layers; the rest as InternVL3-1B (dynamic NTK 2.0 taken from it; not checked for 8B).
QWEN2_5_7B = {**QWEN2_5_0_5B}

# Qwen3-0.6B (InternVL3_5-1B): real 1024 wide, 3072 intermediate, 16 heads / 8 kv heads (2:1) with head_dim
# 128 against hidden / heads = 64, 28 layers, q/k norms, no biases, 40960 positions, tied embeddings,
# vocab 151936 (Qwen3's padded size, larger than the tokenizer). Not certain: InternVL3_5-1B keeping the
# tie and eos 151645 of Qwen3-0.6B.
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # real 128 = 2x hidden / heads; here 32 = 2x 64 / 4
    "num_hidden_layers": 2,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def _longrope_factors(head_dim: int) -> tuple[list[float], list[float]]:
    """Stand-ins for Phi-3-mini-128k's factors (the published lists are not reproduced here): one per
    rotary pair, short ones near 1, long ones growing, as the real lists are shaped."""
    n = head_dim // 2
    short = [round(1.0 + 0.25 * (i / n) ** 4, 4) for i in range(n)]
    long = [round(1.0 + 60.0 * (i / n) ** 2, 4) for i in range(n)]
    return short, long


_SHORT, _LONG = _longrope_factors(96)

# Phi-3-mini-128k-instruct (Mini-InternVL-Chat-4B-V1-5, InternVL2-4B): real 3072 wide, 8192 intermediate,
# 32 heads / 32 kv heads (1:1, head_dim 96, kept: it sizes the 48 longrope factors), 32 layers; longrope
# up to original_max_position_embeddings 4096 of 131072; sliding_window 262144; vocab 32020 = 32000
# SentencePiece pieces + 11 Phi-3 tokens + 9 InternVL tokens. The factor values are stand-ins.
PHI3_MINI_128K = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 32020,
    "hidden_size": 192,
    "intermediate_size": 384,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {"type": "longrope", "short_factor": _SHORT, "long_factor": _LONG},
    "sliding_window": 262144,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Mini-InternVL-Chat-4B-V1-5 predates Phi-3's rename of "su" to "longrope" (taken so; not certain).
PHI3_MINI_128K_SU = {**PHI3_MINI_128K, "rope_scaling": {**PHI3_MINI_128K["rope_scaling"], "type": "su"}}

# -- tokenizers ------------------------------------------------------------------------------------

INTERNVL_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
_QWEN2_5_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_QWEN2_5_PLAIN = [  # added but not special
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
_QWEN3_PLAIN = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
_PHI3_ADDED = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]  # fmt: skip


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer's shape: ``base`` ordinary pieces (a tiny trained vocabulary padded to the real
    count), then ``added`` at consecutive ids from ``base`` (``plain`` ones are added, not special).

    ``kind`` ``internlm2``: a SentencePiece model whose last pieces are InternLM2's six user-defined
    symbols, InternVL's tokens added after it; ``bpe``: a byte-level BPE saved by transformers (a stand-in
    for Qwen's BPE and Phi-3's SentencePiece-based tokenizer), ``leading`` specials at ids 0.. first.
    """

    kind: str
    base: int
    added: tuple[str, ...]
    plain: frozenset[str] = frozenset()
    leading: tuple[str, ...] = ()
    bos: str | None = None
    eos: str = ""
    pad: str = ""
    unk: str | None = None

    def ids(self) -> dict[str, int]:
        return {t: self.base + i for i, t in enumerate(self.added)} | {
            t: i for i, t in enumerate(self.leading)
        }


INTERNLM2_SPM_SYMBOLS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
INTERNLM2_TOKENIZER = TokenizerSpec(
    "internlm2", 92538, INTERNLM2_SPM_SYMBOLS + tuple(INTERNVL_TOKENS), bos="<s>", eos="</s>", pad="</s>", unk="<unk>"
)  # fmt: skip
QWEN2_TOKENIZER = TokenizerSpec(
    "bpe", 151643, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS),
    eos="<|im_end|>", pad="<|endoftext|>",
)  # fmt: skip
QWEN2_5_TOKENIZER = TokenizerSpec(
    "bpe", 151643, (*_QWEN2_5_SPECIALS, *_QWEN2_5_PLAIN, *INTERNVL_TOKENS), frozenset(_QWEN2_5_PLAIN),
    eos="<|im_end|>", pad="<|endoftext|>",
)  # fmt: skip
# InternVL3.5 appends its tokens after Qwen3's 26 (so <img> = 151669); not certain.
QWEN3_TOKENIZER = TokenizerSpec(
    "bpe", 151643, (*_QWEN2_5_SPECIALS, *_QWEN2_5_PLAIN, *_QWEN3_PLAIN, *INTERNVL_TOKENS),
    frozenset(_QWEN2_5_PLAIN) | frozenset(_QWEN3_PLAIN), eos="<|im_end|>", pad="<|endoftext|>",
)  # fmt: skip
# Phi-3's tokenizer adds no BOS in this stand-in (whether the real one does under chat() is not certain).
PHI3_TOKENIZER = TokenizerSpec(
    "bpe", 32000, (*_PHI3_ADDED, *INTERNVL_TOKENS), leading=("<unk>", "<s>", "</s>"),
    bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>",
)  # fmt: skip

# The system messages the checkpoints' own code sets (not config.json; as published, to our knowledge).
SYSTEM_1_5 = "You are an AI assistant whose name is InternLM (书生·浦语)."
SYSTEM_2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class Family:
    """One released model: its original ``config.json`` (scaled widths), tokenizer and what the decoder
    serves of it (``context``: the longest context served exactly, which is the default)."""

    name: str
    vision: dict[str, Any]
    llm: dict[str, Any]
    tokenizer: TokenizerSpec
    template: str
    ps_version: str
    system_message: str
    context: int

    def config(self) -> dict[str, Any]:
        """The top level of ``config.json`` (vision_config / llm_config added by the builder)."""
        return {
            "architectures": ["InternVLChatModel"],
            "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            "model_type": "internvl_chat",
            "template": self.template,
            "ps_version": self.ps_version,
            "downsample_ratio": 0.5,
            "select_layer": -1,
            "force_image_size": 448,
            "dynamic_image_size": True,
            "use_thumbnail": True,
            "min_dynamic_patch": 1,
            "max_dynamic_patch": 12,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


_FAMILY = [
    # InternVL 1.5. InternVL-Chat-V1-5 pixel-shuffles in the v1 order (InternVLChatConfig's default, what
    # it was trained with); written explicitly here. The Mini models: v2 (not certain).
    Family("InternVL-Chat-V1-5", VIT_6B, INTERNLM2_20B, INTERNLM2_TOKENIZER, "internlm2-chat", "v1", SYSTEM_1_5, 32768),
    Family("Mini-InternVL-Chat-2B-V1-5", VIT_300M, INTERNLM2_1_8B, INTERNLM2_TOKENIZER, "internlm2-chat", "v2", SYSTEM_1_5, 32768),
    Family("Mini-InternVL-Chat-4B-V1-5", VIT_300M, PHI3_MINI_128K_SU, PHI3_TOKENIZER, "phi3-chat", "v2", SYSTEM_1_5, 4096),
    # InternVL 2.0
    Family("InternVL2-1B", VIT_300M, QWEN2_0_5B, QWEN2_TOKENIZER, "Hermes-2", "v2", SYSTEM_2, 32768),
    Family("InternVL2-2B", VIT_300M, INTERNLM2_1_8B, INTERNLM2_TOKENIZER, "internlm2-chat", "v2", SYSTEM_2, 32768),
    Family("InternVL2-4B", VIT_300M, PHI3_MINI_128K, PHI3_TOKENIZER, "phi3-chat", "v2", SYSTEM_2, 4096),
    Family("InternVL2-8B", VIT_300M, INTERNLM2_5_7B, INTERNLM2_TOKENIZER, "internlm2-chat", "v2", SYSTEM_2, 32768),
    Family("InternVL2-26B", VIT_6B, INTERNLM2_20B, INTERNLM2_TOKENIZER, "internlm2-chat", "v2", SYSTEM_2, 32768),
    # InternVL 2.5, 3, 3.5
    Family("InternVL2_5-1B", VIT_300M, QWEN2_5_0_5B, QWEN2_5_TOKENIZER, "internvl2_5", "v2", SYSTEM_2_5, 32768),
    Family("InternVL2_5-8B", VIT_300M, INTERNLM2_5_7B, INTERNLM2_TOKENIZER, "internvl2_5", "v2", SYSTEM_2_5, 32768),
    Family("InternVL3-1B", VIT_300M, QWEN2_5_0_5B, QWEN2_5_TOKENIZER, "internvl2_5", "v2", SYSTEM_2_5, 32768),
    Family("InternVL3-8B", VIT_300M, QWEN2_5_7B, QWEN2_5_TOKENIZER, "internvl2_5", "v2", SYSTEM_2_5, 32768),
    # InternVL3_5-1B's system message: taken to be 2.5's (not certain).
    Family("InternVL3_5-1B", VIT_300M, QWEN3_0_6B, QWEN3_TOKENIZER, "internvl2_5", "v2", SYSTEM_2_5, 40960),
]  # fmt: skip

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILY}
