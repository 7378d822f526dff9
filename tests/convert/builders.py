"""Tiny original-format InternVL checkpoints, built in the test from random weights.

The layout is the one OpenGVLab publishes: ``config.json`` with ``vision_config`` / ``llm_config`` /
``template`` / ``ps_version`` ..., weights under the original key names (taken from the in-test
reference modules in ``reference.py``), the tokenizer (for InternLM2 a SentencePiece model trained
here, with the remote-code tokenizer class named in ``tokenizer_config.json``), and the checkpoint's
own Python files, which raise if anything ever executes them.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.convert.reference import HFCausalLM, InternLM2Config, InternLM2ForCausalLM, InternVLChat, VitConfig
from tests.support.families import INTERNVL_TOKENS

CORPUS = [
    "Hello world, this is a tiny corpus for InternVL conversion tests.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Describe the image in detail. What is in the picture? A cat sits on a mat.",
    "图像描述：一只猫坐在垫子上。请详细描述这张图片。",
    "  spaces   and\ttabs\nnew lines  and trailing   ",
    "Image-1: Image-2: Frame-1: <|im_start|>user\n<|im_end|><|im_start|>assistant\n",
    "café naïve résumé — “quotes” and 'apostrophes' (brackets) [1] {2} <3>",
]

# InternLM2's own control symbols live inside the SentencePiece model; InternVL's are added after it.
INTERNLM2_SPM_SYMBOLS = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
]
INTERNVL_ADDED = INTERNVL_TOKENS  # the tokens InternVL adds to its LLM tokenizer, in order

CHECKPOINT_SYSTEM_MESSAGE = 'You are a tiny test model. 你好 😀 "quoted"'

NEVER_RUN = "raise RuntimeError('checkpoint code must never be executed by the converter')\n"


def train_spm(*, vocab_size: int = 400, internlm2_style: bool = True) -> bytes:
    """A BPE SentencePiece model with byte fallback; InternLM2-style: no dummy prefix, identity norm."""
    import sentencepiece as spm

    buf = io.BytesIO()
    options = dict(
        sentence_iterator=iter(CORPUS * 10),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=INTERNLM2_SPM_SYMBOLS if internlm2_style else [],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    if internlm2_style:
        options.update(
            add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False
        )
    else:
        options.update(
            add_dummy_prefix=True, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True
        )
    spm.SentencePieceTrainer.train(**options)
    return buf.getvalue()


class ReferenceInternLM2Tokenizer:
    """``InternLM2Tokenizer`` as it behaves: split on added tokens, ``sp.encode`` each chunk, BOS first."""

    def __init__(self, model: bytes, added: dict[str, int]):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.added = added
        alternatives = sorted(added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")") if added else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.sp.bos_id()] if add_bos else []
        for chunk in self._split.split(text) if self._split else [text]:
            if not chunk:
                continue
            if chunk in self.added:
                ids.append(self.added[chunk])
            else:
                ids += self.sp.encode(chunk)
        return ids


def write_internlm2_tokenizer(out: Path, *, internlm2_style: bool = True) -> ReferenceInternLM2Tokenizer:
    model = train_spm(internlm2_style=internlm2_style)
    (out / "tokenizer.model").write_bytes(model)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    decoder: dict[str, dict] = {}
    added: dict[str, int] = {}
    for piece in ["<unk>", "<s>", "</s>"] + (INTERNLM2_SPM_SYMBOLS if internlm2_style else []):
        decoder[str(sp.piece_to_id(piece))] = added_spec(piece)
        added[piece] = sp.piece_to_id(piece)
    for i, token in enumerate(INTERNVL_ADDED):
        decoder[str(sp.get_piece_size() + i)] = added_spec(token)
        added[token] = sp.get_piece_size() + i
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": decoder,
        "additional_special_tokens": INTERNLM2_SPM_SYMBOLS + INTERNVL_ADDED,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "tokenization_internlm2.py").write_text(NEVER_RUN)
    specials = {k: v for k, v in added.items() if k not in ("<unk>", "<s>", "</s>")}
    return ReferenceInternLM2Tokenizer(model, specials | {"<s>": 1, "</s>": 2, "<unk>": 0})


def added_spec(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": True,
    }


def write_bpe_tokenizer(out: Path, specials: list[str]):
    """A byte-level BPE saved the way transformers saves its own tokenizers (Qwen2 / Phi-3 stand-in)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0])
    fast.save_pretrained(out)
    return fast


@dataclass
class OriginalCheckpoint:
    path: Path
    model: InternVLChat
    template: str
    ps_version: str
    vit: VitConfig
    tokens_per_tile: int
    image_token_id: int
    reference_tokenizer: ReferenceInternLM2Tokenizer | None
    system_message: str


VIT_300M = VitConfig(qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
VIT_6B = VitConfig(qkv_bias=False, qk_normalization=True, norm_type="rms_norm")


def randomize(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_original_checkpoint(
    out: Path,
    *,
    llm: str = "internlm2",
    vit: VitConfig = VIT_300M,
    ps_version: str = "v2",
    template: str = "internlm2-chat",
    shards: int = 1,
    weight_format: str = "safetensors",
    rope_scaling: dict | None = None,
    seed: int = 0,
) -> OriginalCheckpoint:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    reference_tokenizer = None
    if llm == "internlm2":
        reference_tokenizer = write_internlm2_tokenizer(out)
        vocab_size = max(reference_tokenizer.added.values()) + 1
        image_token_id = reference_tokenizer.added["<IMG_CONTEXT>"]
        lm_cfg = InternLM2Config(vocab_size=vocab_size, rope_scaling=rope_scaling)
        language_model = InternLM2ForCausalLM(lm_cfg)
        llm_config = lm_cfg.to_original()
        hidden = lm_cfg.hidden_size
    else:
        specials = {
            "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "phi3": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        }[llm]
        fast = write_bpe_tokenizer(out, specials + INTERNVL_ADDED)
        vocab_size = len(fast)
        image_token_id = fast.convert_tokens_to_ids("<IMG_CONTEXT>")
        language_model, llm_config = _hf_llm(llm, vocab_size)
        hidden = llm_config["hidden_size"]

    model = InternVLChat(vit, language_model, hidden, ps_version).eval()
    randomize(model, seed)
    state = model.state_dict_original()
    write_weights(out, state, shards, weight_format)

    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat",
        "template": template,
        "ps_version": ps_version,
        "downsample_ratio": 0.5,
        "select_layer": -1,
        "force_image_size": vit.image_size,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "torch_dtype": "float32",
        "vision_config": vit.to_original(),
        "llm_config": llm_config,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "conversation.py").write_text(conversation_py(template, CHECKPOINT_SYSTEM_MESSAGE))
    (out / "modeling_internvl_chat.py").write_text(
        NEVER_RUN + "class InternVLChatModel:\n    def __init__(self):\n        self.system_message = None\n"
    )
    tokens_per_tile = (vit.image_size // vit.patch_size) ** 2 // 4
    return OriginalCheckpoint(
        out, model, template, ps_version, vit, tokens_per_tile, image_token_id, reference_tokenizer,
        CHECKPOINT_SYSTEM_MESSAGE,
    )  # fmt: skip


def _hf_llm(llm: str, vocab_size: int):
    from transformers import (
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    if llm == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=1e6)
        arch, model = "Qwen2ForCausalLM", Qwen2ForCausalLM(cfg)
    elif llm == "qwen3":  # InternVL3.5: q/k norms, head_dim 12 against hidden / heads = 8
        cfg = Qwen3Config(**common, head_dim=12, rope_theta=1e6, attention_bias=False)
        arch, model = "Qwen3ForCausalLM", Qwen3ForCausalLM(cfg)
    else:
        cfg = Phi3Config(**common, rope_theta=1e4)
        arch, model = "Phi3ForCausalLM", Phi3ForCausalLM(cfg)
    config = cfg.to_dict()
    config["architectures"] = [arch]
    config["attn_implementation"] = "eager"
    return HFCausalLM(model.eval()), config


def write_weights(out: Path, state: dict[str, torch.Tensor], shards: int, weight_format: str) -> None:
    from safetensors.torch import save_file

    names = sorted(state)
    ext = "safetensors" if weight_format == "safetensors" else "bin"
    stem = "model" if weight_format == "safetensors" else "pytorch_model"
    weight_map = {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
        if weight_format == "safetensors":
            save_file(part, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(part, out / file)
        weight_map.update({n: file for n in part})
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def conversation_py(template: str, system_message: str) -> str:
    return (
        NEVER_RUN
        + "register_conv_template(\n    Conversation(\n"
        + f"        name={template!r},\n"
        + "        system_template='<|im_start|>system\\n{system_message}',\n"
        + f"        system_message={system_message!r},\n"
        + "        sep='<|im_end|>',\n    )\n)\n"
        + "register_conv_template(Conversation(name='other', system_message='not this one'))\n"
    )
