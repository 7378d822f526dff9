"""Incremental detokenisation: no broken UTF-8 mid-stream, deltas add up to a one-shot decode."""

from __future__ import annotations

from services.decoder.engine.detokenizer import IncrementalDetokenizer

TEXT = "春眠不觉晓，处处闻啼鸟。Hello, 世界! 夜来风雨声，花落知多少。🌸 done"


def stream(tokenizer, ids, stop=None):
    d = IncrementalDetokenizer(tokenizer, True, stop)
    deltas = [d.add([t]) for t in ids]
    if not d.stopped:
        deltas.append(d.finish())
    return d, deltas


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces)  # the tokenizer does split characters into bytes
    _, deltas = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT


def test_final_text_equals_one_shot_decode_even_when_cut_mid_character(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for cut in range(1, len(ids)):
        _, deltas = stream(tokenizer, ids[:cut])
        assert "".join(deltas) == tokenizer.decode(ids[:cut], skip_special_tokens=True)


def test_stop_string_cuts_text_across_tokens(tokenizer):
    ids = tokenizer("The answer is 42. STOP here please", add_special_tokens=False)["input_ids"]
    d, deltas = stream(tokenizer, ids, stop=["STOP here"])
    assert d.stopped
    assert "".join(deltas) == "The answer is 42. "


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


class CountingTokenizer:
    """A real tokenizer that counts the scans of its vocabulary."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.vocab_scans = 0

    def get_vocab(self):
        self.vocab_scans += 1
        return self.inner.get_vocab()

    def decode(self, ids, **kw):
        return self.inner.decode(ids, **kw)


def test_the_vocabulary_is_scanned_once_per_tokenizer_not_per_request(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    first, second = CountingTokenizer(tokenizer), CountingTokenizer(tokenizer)
    for _ in range(5):
        _, deltas = stream(first, ids)
        assert "".join(deltas) == TEXT
    stream(second, ids)
    assert (first.vocab_scans, second.vocab_scans) == (1, 1)
