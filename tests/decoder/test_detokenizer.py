"""Incremental detokenisation: no broken UTF-8 mid-stream, deltas add up to a one-shot decode, stop
strings cut where a one-shot decode would put them.

The tokenizers: the tiny checkpoint's byte-level BPE (decoded through ``DecodeStream``), InternVL2's
Qwen2 and InternLM2 tokenizers at their real ids (``tests/support/family_checkpoints.py``; InternLM2's
rebuilt by the converter: a SentencePiece BPE with byte fallback, decoded through the window), a
SentencePiece model that strips a dummy prefix on decoding (Llama-style), and slow tokenizers (any of
them seen only through ``decode``).
"""

from __future__ import annotations

import random

import pytest

from services.convert.tokenizer import build_internlm2_tokenizer
from services.decoder.engine.detokenizer import IncrementalDetokenizer, tokenizer_facts
from tests.convert.builders import write_internlm2_tokenizer
from tests.decoder.helpers import SlowTokenizer
from tests.support.families import INTERNLM2_TOKENIZER, QWEN2_TOKENIZER
from tests.support.family_checkpoints import write_tokenizer

TEXT = "春眠不觉晓，处处闻啼鸟。Hello, 世界! 夜来风雨声，花落知多少。🌸 done"


@pytest.fixture(scope="module")
def tokenizers(tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    qwen2, internlm2, dummy = (tmp_path_factory.mktemp(n) for n in ("qwen2", "internlm2", "dummy-prefix"))
    write_tokenizer(QWEN2_TOKENIZER, qwen2)
    write_tokenizer(INTERNLM2_TOKENIZER, internlm2)
    write_internlm2_tokenizer(dummy, internlm2_style=False)
    found = {
        "tiny-bpe": tokenizer,
        "qwen2": AutoTokenizer.from_pretrained(qwen2),
        "internlm2": build_internlm2_tokenizer(internlm2),
        "dummy-prefix": build_internlm2_tokenizer(dummy),
    }
    found["slow-bpe"] = SlowTokenizer(tokenizer)
    found["slow-internlm2"] = SlowTokenizer(found["internlm2"])
    return found


def stream(tokenizer, ids, stop=None, skip=True, chunks=None):
    """Feed ``ids`` (``chunks`` tokens at a time, default 1); the deltas and the detokenizer."""
    d = IncrementalDetokenizer(tokenizer, skip, stop)
    sizes = iter(chunks or [])
    deltas, i = [], 0
    while i < len(ids):
        n = next(sizes, 1)
        deltas.append(d.add(ids[i : i + n]))
        i += n
    deltas.append(d.finish())
    return d, deltas


def decode(tokenizer, ids, skip=True):
    inner = getattr(tokenizer, "inner", tokenizer)
    return inner.decode(ids, skip_special_tokens=skip)


_POOLS: dict[int, tuple[list[list[int]], list[int]]] = {}


def random_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Ids a model could sample, weighted towards what makes decoding hard: text tokens, byte-fallback
    tokens, special and added tokens, never-trained fillers and ids beyond the vocabulary."""
    inner = getattr(tokenizer, "inner", tokenizer)
    if id(inner) not in _POOLS:
        vocab = inner.get_vocab()
        text = [i for t, i in vocab.items() if not t.startswith(("<unused_", "<0x"))]
        fillers = [i for t, i in vocab.items() if t.startswith("<unused_")] or text
        top = max(vocab.values())
        pools = [text, sorted(tokenizer_facts(inner).byte_ids) or text, sorted(inner.added_tokens_decoder)]
        _POOLS[id(inner)] = ([*pools, fillers, [top + 1, top + 7]], [45, 30, 12, 8, 5])
    pools, weights = _POOLS[id(inner)]
    return [rng.choice(rng.choices(pools, weights)[0]) for _ in range(n)]


KINDS = ["tiny-bpe", "qwen2", "internlm2", "dummy-prefix", "slow-bpe", "slow-internlm2"]


def test_each_tokenizer_gets_the_source_meant_for_it(tokenizers):
    streamed = {k for k in KINDS if tokenizer_facts(tokenizers[k]).backend is not None}
    assert streamed == {"tiny-bpe", "qwen2"}  # byte-level decoders, fast tokenizers
    assert tokenizer_facts(tokenizers["internlm2"]).byte_ids  # byte fallback: the window


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
@pytest.mark.parametrize("kind", KINDS)
def test_deltas_add_up_to_decode_for_random_tokens(tokenizers, kind, skip):
    tokenizer = tokenizers[kind]
    rng = random.Random(f"{kind}-{skip}")
    for _ in range(120):
        ids = random_ids(tokenizer, rng, rng.randint(1, 48))
        chunks = [rng.choice([1, 1, 1, 2, 3]) for _ in ids]
        _, deltas = stream(tokenizer, ids, skip=skip, chunks=chunks)
        assert "".join(deltas) == decode(tokenizer, ids, skip), ids


@pytest.mark.parametrize("kind", KINDS)
def test_multibyte_characters_are_never_split(tokenizers, kind):
    tokenizer = tokenizers[kind]
    inner = getattr(tokenizer, "inner", tokenizer)
    ids = inner(TEXT + " 😀龘", add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in inner.decode([t]) for t in ids)  # the tokenizer does split characters
    _, deltas = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    expected = inner.decode(ids)  # TEXT, NFKC-folded by the dummy-prefix model
    assert "".join(deltas) == expected and expected.endswith("done 😀龘")


def test_final_text_equals_one_shot_decode_even_when_cut_mid_character(tokenizers):
    for kind in ("tiny-bpe", "internlm2"):
        tokenizer = tokenizers[kind]
        ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        for cut in range(1, len(ids)):
            _, deltas = stream(tokenizer, ids[:cut])
            assert "".join(deltas) == tokenizer.decode(ids[:cut], skip_special_tokens=True)


def test_a_skipped_special_token_does_not_end_a_byte_run(tokenizers):
    """decode drops the special token first, so the bytes on either side of it form one run: here an
    invalid one (``P`` then half a character), which decodes to U+FFFD for every byte."""
    tokenizer = tokenizers["internlm2"]
    tid = tokenizer.convert_tokens_to_ids
    ids = [tid("<0x50>"), tid("<img>"), tid("<0xE8>"), tid("he")]
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == "\ufffd\ufffdhe"


def test_a_skipped_special_token_keeps_the_space_a_stripping_decoder_would_drop(tokenizers):
    """A decoder that strips its first space (a dummy prefix) must not see the new token first."""
    tokenizer = tokenizers["dummy-prefix"]
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    ids = ids[:1] + [tokenizer.convert_tokens_to_ids("<img>")] + ids[1:]
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


def test_stop_string_cuts_text_across_tokens(tokenizer):
    ids = tokenizer("The answer is 42. STOP here please", add_special_tokens=False)["input_ids"]
    d, deltas = stream(tokenizer, ids, stop=["STOP here"])
    assert d.stopped
    assert "".join(deltas) == "The answer is 42. "


@pytest.mark.parametrize("kind", ["tiny-bpe", "internlm2", "slow-internlm2"])
@pytest.mark.parametrize("stop", ["😀龘", "龘 e", "😀", "猫\n😀", "\n😀", " end"])
def test_stop_string_spanning_byte_fallback_runs(tokenizers, kind, stop):
    tokenizer = tokenizers[kind]
    inner = getattr(tokenizer, "inner", tokenizer)
    text = "一只猫\n😀龘 end of it"
    ids = inner(text, add_special_tokens=False)["input_ids"]
    d, deltas = stream(tokenizer, ids, stop=[stop, "never seen"])
    assert d.stopped
    assert "".join(deltas) == text[: text.index(stop)]
    assert all("\ufffd" not in x for x in deltas)


def test_stop_string_completed_by_the_last_byte_run(tokenizers):
    """The last run is decoded only at the end: the stop string is still found there."""
    tokenizer = tokenizers["internlm2"]
    ids = tokenizer("ab 😀", add_special_tokens=False)["input_ids"]
    d, deltas = stream(tokenizer, ids, stop=["😀"])
    assert d.stopped and "".join(deltas) == "ab "


@pytest.mark.parametrize("kind", KINDS)
def test_stop_strings_in_random_tokens_cut_where_one_shot_decode_has_them(tokenizers, kind):
    tokenizer = tokenizers[kind]
    rng = random.Random(kind)
    found = 0
    for _ in range(120):
        ids = random_ids(tokenizer, rng, rng.randint(2, 40))
        full = decode(tokenizer, ids)
        if len(full) < 2:
            continue
        start = rng.randrange(len(full) - 1)
        stop = full[start : start + rng.randint(1, 6)]
        d, deltas = stream(tokenizer, ids, stop=[stop])
        assert d.stopped, (ids, stop)
        assert "".join(deltas) == full[: full.index(stop)], (ids, stop)
        found += 1
    assert found > 80


def test_possible_stop_prefix_is_held_back(tokenizer):
    d = IncrementalDetokenizer(tokenizer, True, ["END"])
    out = ""
    for t in tokenizer("abc EN", add_special_tokens=False)["input_ids"]:
        out += d.add([t])
    assert out == "abc " and not d.stopped  # "EN" might start "END"
    for t in tokenizer("X", add_special_tokens=False)["input_ids"]:
        out += d.add([t])
    assert out == "abc ENX"


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("hi<|im_end|>", add_special_tokens=False)["input_ids"]
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "hi"


def test_the_vocabulary_is_scanned_once_per_tokenizer_not_per_request(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    first, second = SlowTokenizer(tokenizer), SlowTokenizer(tokenizer)
    for _ in range(5):
        _, deltas = stream(first, ids)
        assert "".join(deltas) == TEXT
    stream(second, ids)
    assert (first.vocab_scans, second.vocab_scans) == (1, 1)


def test_the_work_per_token_does_not_grow_with_the_output(tokenizers):
    """Each step decodes a window of a few tokens, whatever the length so far: at most two decodes a
    token (a byte-fallback run is decoded whole when it ends: up to 33 tokens of TEXT here)."""
    for kind in ("tiny-bpe", "internlm2"):
        tokenizer = SlowTokenizer(tokenizers[kind])
        ids = tokenizer.inner(TEXT * 40, add_special_tokens=False)["input_ids"]
        _, deltas = stream(tokenizer, ids, stop=["never seen"])
        assert "".join(deltas) == TEXT * 40
        assert len(ids) > 2000 and len(tokenizer.decoded) <= 2 * len(ids) + 1
        assert sum(tokenizer.decoded) <= 8 * len(ids) and max(tokenizer.decoded) < 50
