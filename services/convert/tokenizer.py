"""The tokenizer of an original InternVL checkpoint → a fast tokenizer transformers loads natively.

InternLM2 checkpoints ship a SentencePiece model with remote code (``InternLM2Tokenizer``); it is
rebuilt here as a ``tokenizers`` BPE with the same ids, without running that code. Qwen2, Phi-3 and
Llama checkpoints already use transformers' own tokenizer classes and are loaded as they are. Either
way the result gets the InternVL image-token attributes (``start_image_token`` = ``<img>``,
``end_image_token`` = ``</img>``, ``context_image_token`` = ``<IMG_CONTEXT>``, which transformers'
``InternVLProcessor`` reads) and the chat template of the checkpoint's conversation template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPM_BPE = 2


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def _token_content(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.get("content")


# -- InternLM2: sentencepiece → tokenizers -------------------------------------------------------


@dataclass(frozen=True)
class _SpecialTokens:
    """The BOS/EOS/UNK/PAD tokens and whether BOS and EOS frame every sequence."""

    bos: str
    eos: str
    unk: str
    pad: str
    add_bos: bool
    add_eos: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], pieces, trainer) -> _SpecialTokens:
        """``tokenizer_config.json``'s choices, else the SentencePiece model's own pieces."""
        eos = _token_content(config.get("eos_token")) or _piece(pieces, trainer.eos_id, "</s>")
        return cls(
            bos=_token_content(config.get("bos_token")) or _piece(pieces, trainer.bos_id, "<s>"),
            eos=eos,
            unk=_token_content(config.get("unk_token")) or trainer.unk_piece or "<unk>",
            pad=_token_content(config.get("pad_token")) or eos,
            add_bos=bool(config.get("add_bos_token", True)),
            add_eos=bool(config.get("add_eos_token", False)),
        )


def build_internlm2_tokenizer(src: Path):
    """A ``PreTrainedTokenizerFast`` equal in ids to ``InternLM2Tokenizer`` on ``src``.

    ``InternLM2Tokenizer`` splits text on added tokens, encodes each remaining chunk with
    ``sp_model.encode`` and prepends BOS. The equivalent pipeline: added tokens (extracted before
    normalisation), the SentencePiece normaliser settings of the model (charsmap, whitespace
    removal, dummy prefix per chunk), spaces as ``▁``, and a BPE whose merge ranks follow the piece
    scores, which is how SentencePiece BPE picks the next merge.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    proto = _read_sentencepiece_bpe(src)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    config = _read_json(src / "tokenizer_config.json")
    added = _added_tokens(src, config)
    _check_no_inline_symbols(pieces, added, norm)
    vocab = _vocab_with_added_tokens(pieces, added)

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces, vocab),
            unk_token=trainer.unk_piece or "<unk>",
            fuse_unk=True,
            byte_fallback=bool(trainer.byte_fallback),
            dropout=None,
        )
    )
    _set_normalizer_and_decoder(tok, norm)
    _add_special_and_added_tokens(tok, pieces, added, vocab)
    special = _SpecialTokens.from_config(config, pieces, trainer)
    tok.post_processor = _post_processor(special, vocab)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special.bos,
        eos_token=special.eos,
        unk_token=special.unk,
        pad_token=special.pad,
        model_max_length=int(config.get("model_max_length", 1 << 30)),
        clean_up_tokenization_spaces=False,
        extra_special_tokens=dict(IMAGE_TOKENS),
    )


def _read_sentencepiece_bpe(src: Path):
    """``src/tokenizer.model`` as a SentencePiece ``ModelProto``, checked to be a BPE we can rebuild."""
    from sentencepiece import sentencepiece_model_pb2

    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        raise FailedPrecondition(
            f"{src} has no tokenizer.model for the InternLM2 tokenizer", reason="unsupported_layout"
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != _SPM_BPE:
        raise FailedPrecondition("only BPE SentencePiece models are supported", reason="unsupported_layout")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise FailedPrecondition("treat_whitespace_as_suffix is not supported", reason="unsupported_layout")
    return proto


def _check_no_inline_symbols(pieces, added: dict[int, tuple[str, bool]], norm) -> None:
    """Refuse user-defined symbols outside the added tokens when chunks are whitespace-normalised.

    ``InternLM2Tokenizer`` splits on its added tokens and normalises each chunk; SentencePiece matches
    its other user-defined symbols inside one chunk. With per-chunk whitespace rules the two differ in
    a way one tokenizers pipeline cannot express.
    """
    listed = {content for content, _ in added.values()}
    inline_symbols = [p.piece for p in pieces if p.type == _USER_DEFINED and p.piece not in listed]
    if inline_symbols and (norm.add_dummy_prefix or norm.remove_extra_whitespaces):
        raise FailedPrecondition(
            f"user-defined symbols {inline_symbols[:5]} outside the added tokens, combined with "
            "add_dummy_prefix/remove_extra_whitespaces, are not supported",
            reason="unsupported_layout",
        )


def _vocab_with_added_tokens(pieces, added: dict[int, tuple[str, bool]]) -> dict[str, int]:
    """piece → id of the SentencePiece model, plus the added tokens past its end.

    An added token inside the model's range must be the piece already there; one past it must have
    a single id.
    """
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    for token_id, (content, _special) in sorted(added.items()):
        if token_id < len(pieces):
            if pieces[token_id].piece != content:
                raise FailedPrecondition(
                    f"added token {content!r} claims id {token_id}, which the SentencePiece model gives to "
                    f"{pieces[token_id].piece!r}",
                    reason="unsupported_layout",
                )
        elif content in vocab and vocab[content] != token_id:
            raise FailedPrecondition(f"added token {content!r} has two ids", reason="unsupported_layout")
        else:
            vocab[content] = token_id
    return vocab


def _set_normalizer_and_decoder(tok, norm) -> None:
    """SentencePiece's normaliser settings (charsmap, whitespace, dummy prefix, ``▁``) and their inverse."""
    from tokenizers import Regex, decoders, normalizers

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if norm.add_dummy_prefix else [])
    )


def _add_special_and_added_tokens(
    tok, pieces, added: dict[int, tuple[str, bool]], vocab: dict[str, int]
) -> None:
    """SentencePiece's own control and user-defined symbols never go through BPE; nor do added tokens."""
    from tokenizers import AddedToken

    specials = {p.piece for p in pieces if p.type in (_CONTROL, _UNKNOWN)}
    specials |= {content for content, special in added.values() if special}
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED and p.piece not in specials]
    plain_added = [
        content for content, special in added.values() if not special and content not in user_defined
    ]
    ordered = sorted(specials, key=vocab.__getitem__)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ordered])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined + plain_added])


def _post_processor(special: _SpecialTokens, vocab: dict[str, int]):
    """BOS and EOS around every sequence (and pair) as ``tokenizer_config.json`` asks."""
    from tokenizers import processors

    bos, eos = special.bos, special.eos
    single = ([f"{bos}:0"] if special.add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if special.add_eos else [])
    pair = single + ["$B:1"] + ([f"{eos}:1"] if special.add_eos else [])
    used = [t for t, on in ((bos, special.add_bos), (eos, special.add_eos)) if on]
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=[(t, vocab[t]) for t in used]
    )


def _piece(pieces, index: int, default: str) -> str:
    return pieces[index].piece if 0 <= index < len(pieces) else default


def _added_tokens(src: Path, config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """id → (content, special) from ``tokenizer_config.json`` and the older ``added_tokens.json``."""
    out: dict[int, tuple[str, bool]] = {}
    for token_id, spec in (config.get("added_tokens_decoder") or {}).items():
        out[int(token_id)] = (spec["content"], bool(spec.get("special", True)))
    for content, token_id in _read_json(src / "added_tokens.json").items():
        out.setdefault(int(token_id), (content, True))
    return out


def _bpe_merges(pieces, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges ranked as SentencePiece BPE applies them: higher piece score first, then lower id.

    Every split of a normal piece into two known pieces is a merge producing it.
    """
    ranked = []
    for piece in pieces:
        if piece.type != _NORMAL:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, vocab[text], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# -- families whose tokenizer transformers knows ------------------------------------------------


def load_native_tokenizer(src: Path):
    """The checkpoint's tokenizer through ``AutoTokenizer``, never running remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(src), trust_remote_code=False, extra_special_tokens=dict(IMAGE_TOKENS)
        )
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError variously
        raise FailedPrecondition(
            f"the tokenizer in {src} cannot be loaded without remote code: {exc}", reason="unsupported_layout"
        ) from exc


TOKENIZER_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "internlm2_sentencepiece": build_internlm2_tokenizer,
    "auto": load_native_tokenizer,
}


def convert_tokenizer(src: Path, kind: str, chat_template: str):
    """Build the native tokenizer for ``kind``, check the image tokens, attach the chat template."""
    tokenizer = TOKENIZER_BUILDERS[kind](src)
    vocab = tokenizer.get_vocab()
    missing = [t for t in IMAGE_TOKENS.values() if t not in vocab]
    if missing:
        raise FailedPrecondition(
            f"the tokenizer in {src} lacks the InternVL image tokens {missing}", reason="unsupported_layout"
        )
    for attribute, token in IMAGE_TOKENS.items():
        if getattr(tokenizer, attribute, None) != token:
            raise FailedPrecondition(
                f"tokenizer attribute {attribute} did not take", reason="unsupported_layout"
            )
    tokenizer.chat_template = chat_template
    return tokenizer
