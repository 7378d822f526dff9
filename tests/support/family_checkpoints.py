"""Original-layout checkpoints of the rows of ``tests/support/families.py``, random weights.

The layout is what OpenGVLab publishes and ``convert`` reads (``InternVLChatModel``, ``vision_config`` /
``llm_config`` exactly as the table gives them, weights under the original key names, the checkpoint's
tokenizer files and Python, which must never run). The tokenizers are tiny trained vocabularies padded
to the real piece count, so every special token sits at its real id and the embedding has the real
number of rows: InternLM2's a SentencePiece model whose last pieces are its user-defined symbols,
the others byte-level BPEs saved by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.convert.builders import (
    CORPUS,
    NEVER_RUN,
    added_spec,
    conversation_py,
    randomize,
    train_spm,
    write_weights,
)
from tests.convert.reference import HFCausalLM, InternLM2Config, InternLM2ForCausalLM, InternVLChat, VitConfig
from tests.support.families import Family, TokenizerSpec

# sentencepiece ModelProto.SentencePiece.Type
_USER_DEFINED, _UNUSED = 4, 5


def build_family_checkpoint(family: Family, out: Path, seed: int = 0) -> Path:
    """Write ``family``'s original-layout checkpoint to ``out`` and return it."""
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(family.tokenizer, out)
    if ids != family.tokenizer.ids():
        raise AssertionError(
            f"{family.name}: special tokens at {ids}, the table says {family.tokenizer.ids()}"
        )
    vision = _vit(family.vision)
    llm = family.llm
    model = InternVLChat(vision, _language_model(llm), llm["hidden_size"], family.ps_version).eval()
    # std 0.05 (not builders' 0.3): with 768 image tokens, larger weights saturate attention and the
    # greedy answer repeats one token whatever the input.
    randomize(model, seed, std=0.05)
    state = model.state_dict_original()
    if llm.get("tie_word_embeddings"):
        del state["language_model.lm_head.weight"]  # saved once, as a tied model saves it
    write_weights(out, state, 1, "safetensors")
    config = family.config() | {"vision_config": family.vision, "llm_config": llm}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "conversation.py").write_text(conversation_py(family.template, family.system_message))
    (out / "modeling_internvl_chat.py").write_text(NEVER_RUN + "class InternVLChatModel:\n    pass\n")
    return out


def _vit(c: dict) -> VitConfig:
    return VitConfig(
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        image_size=c["image_size"],
        patch_size=c["patch_size"],
        qkv_bias=c["qkv_bias"],
        qk_normalization=c["qk_normalization"],
        norm_type=c["norm_type"],
        layer_norm_eps=c["layer_norm_eps"],
    )


# The llm_config keys that decide tensor shapes; the rest (rope, eps, ids) only the converter reads.
_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_bias",
    "tie_word_embeddings",
)


def _language_model(c: dict) -> torch.nn.Module:
    from transformers import (
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    architecture = c["architectures"][0]
    if architecture == "InternLM2ForCausalLM":
        shape = {k: c[k] for k in _SHAPE_KEYS[:6]}
        return InternLM2ForCausalLM(InternLM2Config(**shape, bias=c["bias"]))
    config_class, model_class = {
        "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
        "Qwen3ForCausalLM": (Qwen3Config, Qwen3ForCausalLM),
        "Phi3ForCausalLM": (Phi3Config, Phi3ForCausalLM),
    }[architecture]
    config = config_class(**{k: c[k] for k in _SHAPE_KEYS if k in c})
    return HFCausalLM(model_class(config).eval())


# -- tokenizers ------------------------------------------------------------------------------------


def write_tokenizer(spec: TokenizerSpec, out: Path) -> dict[str, int]:
    """Write the tokenizer files of ``spec`` to ``out``; return the ids its special tokens got."""
    if spec.kind == "internlm2":
        return _write_internlm2(spec, out)
    return _write_bpe(spec, out)


def _write_internlm2(spec: TokenizerSpec, out: Path) -> dict[str, int]:
    """InternLM2's layout: SentencePiece pieces up to ``base`` (the trained ones, then unused fillers),
    its user-defined symbols last in the model, InternVL's tokens added in ``tokenizer_config.json``."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(train_spm(internlm2_style=True))
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces if p.type != _USER_DEFINED]
    symbols = [t for t in spec.added if t.startswith("<|")]
    del proto.pieces[:]
    for piece, score, kind in pieces:
        proto.pieces.add(piece=piece, score=score, type=kind)
    for i in range(len(pieces), spec.base):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=_UNUSED)
    for symbol in symbols:
        proto.pieces.add(piece=symbol, score=0.0, type=_USER_DEFINED)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    model = proto.SerializeToString()
    (out / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    ids = {t: sp.piece_to_id(t) for t in symbols}
    ids |= {t: sp.get_piece_size() + i for i, t in enumerate(t for t in spec.added if t not in symbols)}
    decoder = {str(sp.piece_to_id(p)): added_spec(p) for p in ("<unk>", "<s>", "</s>")}
    decoder |= {str(i): added_spec(t) for t, i in ids.items()}
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(spec.added),
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "unk_token": spec.unk,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "tokenization_internlm2.py").write_text(NEVER_RUN)
    return ids


def _write_bpe(spec: TokenizerSpec, out: Path) -> dict[str, int]:
    """A byte-level BPE trained on the tiny corpus, its vocabulary padded with unreachable fillers to
    ``base`` entries, then the added tokens in order, so each gets its real id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(spec.leading),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    # Fillers: no merge produces them, so text never encodes to them (the model may still emit them).
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), spec.base)})
    tok = Tokenizer.from_str(json.dumps(data))
    for token in spec.added:
        added = AddedToken(token, normalized=False, special=token not in spec.plain)
        (tok.add_tokens if token in spec.plain else tok.add_special_tokens)([added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        model_max_length=8192,
    )
    fast.save_pretrained(out)
    return {t: fast.convert_tokens_to_ids(t) for t in (*spec.added, *spec.leading)}
