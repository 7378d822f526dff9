"""Random-weight InternVL checkpoints in transformers' native format, for tests and benchmarks.

The checkpoint is laid out as the ``OpenGVLab/InternVL*-hf`` repositories ship it: ``config.json``
(``InternVLConfig``), safetensors weights, a fast tokenizer with the InternVL special tokens and the
``start_image_token`` / ``end_image_token`` / ``context_image_token`` attributes, a chat template,
``preprocessor_config.json`` with the tiling limits and ``generation_config.json``. Every layer of the
mesh loads it through the same code as a real checkpoint.

The tokenizer is a byte-level BPE trained at creation time from ``data/tokenizer_corpus.txt`` (English
and Chinese), with a pinned vocabulary size; training is deterministic, so the same seed gives the
same files. Chinese characters outside the learned merges are split into several byte tokens, which is
what exercises incremental detokenisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from services.common.errors import InvalidArgument

# Vocabulary of the trained tokenizer, special tokens included. Pinned: tests rely on it.
VOCAB_SIZE = 1024

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]

# The InternVL 2.5 / 3 system message (read from the checkpoint's template by consumers; never assumed).
DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

# MPT-style template of InternVL 2.5 / 3 (``internvl2_5``): a newline after every <|im_end|>. An image
# part renders as the context token, which the caller expands to <img> + <IMG_CONTEXT> x N + </img>,
# exactly as transformers' InternVLProcessor does.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif content['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
).replace("default_system", json.dumps(DEFAULT_SYSTEM_MESSAGE, ensure_ascii=False))


@dataclass(frozen=True)
class Preset:
    """Pinned dimensions. ``tiny`` runs a forward in milliseconds; ``small`` is for benchmarks."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    max_position_embeddings: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(32, 2, 2, 64, 64, 2, 4, 2, 128, 8192),
    "small": Preset(256, 4, 4, 1024, 512, 6, 8, 4, 2048, 16384),
}

LLM_FAMILIES = ("qwen2", "llama", "qwen3", "phi3")

# What each family's text config adds to the common dimensions. Qwen3's head_dim (24) differs from
# hidden / heads on purpose: the q/k/v widths then differ from the hidden size, as in real Qwen3 models.
_FAMILY_TEXT = {
    "qwen2": {"model_type": "qwen2"},
    "llama": {"model_type": "llama", "attention_bias": False, "mlp_bias": False},
    "qwen3": {"model_type": "qwen3", "attention_bias": False, "head_dim": 24, "use_sliding_window": False},
    "phi3": {"model_type": "phi3", "sliding_window": None},
}


def corpus_text() -> str:
    return resources.files("services.common").joinpath("data/tokenizer_corpus.txt").read_text("utf-8")


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the deterministic byte-level BPE tokenizer; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_text().splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer trained to {tok.get_vocab_size()} tokens, expected {vocab_size}: the corpus is too small"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=8192,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_seq_length(patch_size: int, downsample_ratio: float) -> int:
    """Image tokens per 448 tile: the patch grid, reduced by pixel shuffle per side."""
    return (448 // patch_size // round(1 / downsample_ratio)) ** 2


def build_config(
    preset: Preset,
    llm: str,
    tokenizer,
    max_dynamic_patch: int = 12,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    text_overrides: dict | None = None,
):
    """The InternVL config of ``preset``: 448 tiles cut into ``patch_size`` patches, whose grid pixel
    shuffle reduces by ``downsample_ratio`` per side (InternVL's own models: 14 and 0.5, 256 tokens).

    ``text_overrides`` replace keys of the language model's config (e.g. ``max_position_embeddings``
    and ``rope_parameters`` for a rope variant, or Phi-3's ``original_max_position_embeddings``)."""
    from transformers import InternVLConfig

    factor = round(1 / downsample_ratio)
    if 448 % (factor * patch_size):
        raise InvalidArgument(f"a 448 tile in {patch_size}-pixel patches does not pixel-shuffle by {factor}")

    text_common = dict(
        vocab_size=len(tokenizer),
        hidden_size=preset.llm_hidden,
        num_hidden_layers=preset.llm_layers,
        num_attention_heads=preset.llm_heads,
        num_key_value_heads=preset.llm_kv_heads,
        intermediate_size=preset.llm_intermediate,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    if llm not in _FAMILY_TEXT:
        raise InvalidArgument(f"llm must be one of {LLM_FAMILIES}, got {llm!r}")
    text_config = {**_FAMILY_TEXT[llm], **text_common, **(text_overrides or {})}
    vision_config = dict(
        hidden_size=preset.vision_hidden,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        intermediate_size=preset.vision_intermediate,
        attention_bias=True,
        image_size=[448, 448],
        patch_size=[patch_size, patch_size],
        norm_type="layer_norm",
        use_qk_norm=False,
        layer_scale_init_value=0.1,
        use_mean_pooling=True,
    )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length(patch_size, downsample_ratio),
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return config


def make_tiny_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    llm: str = "qwen2",
    init_std: float = 0.06,
    text_overrides: dict | None = None,
) -> Path:
    """Write a random-weight native InternVL checkpoint to ``out_dir`` and return its path.

    ``init_std`` is larger than transformers' default (0.02) so that a random model's greedy tokens
    depend visibly on its inputs, which is what the fidelity tests need to have teeth.
    ``text_overrides``: see :func:`build_config`.
    """
    import torch
    from transformers import InternVLForConditionalGeneration

    if preset not in PRESETS:
        raise InvalidArgument(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = build_config(PRESETS[preset], llm, tokenizer, text_overrides=text_overrides)

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * init_std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    return save_checkpoint(
        model,
        tokenizer,
        out,
        {
            "origin": "random",
            "preset": preset,
            "seed": seed,
            "llm": llm,
            "init_std": init_std,
            "text_overrides": text_overrides or {},
        },
    )


def save_checkpoint(model, tokenizer, out_dir: str | Path, provenance: dict) -> Path:
    """Write ``model`` + ``tokenizer`` as a native InternVL checkpoint, with the processor files and
    ``mesh_checkpoint.json`` (where the weights came from)."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": 12,
        "size": {"height": 448, "width": 448},
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "processor_class": "InternVLProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "processor_config.json").write_text(
        json.dumps(
            {"image_seq_length": config.image_seq_length, "processor_class": "InternVLProcessor"}, indent=2
        )
        + "\n"
    )
    (out / "mesh_checkpoint.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
