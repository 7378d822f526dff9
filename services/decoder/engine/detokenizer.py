"""Incremental detokenisation and stop strings, in O(new tokens) per step.

The contract: the deltas a request's detokenizer hands out add up to exactly
``tokenizer.decode(output ids, skip_special_tokens=...)`` (or, after a stop string, to that text cut
before the stop string), and no delta ever holds half a character: a multi-byte UTF-8 character split
over several tokens is emitted once it is complete.

Two sources of text, chosen once per tokenizer (``tokenizer_facts``):

- ``_StreamText``: ``tokenizers.decoders.DecodeStream``, one per request, for a fast tokenizer whose
  decoder is byte-level (Qwen2 / Qwen2.5 / Qwen3 / GPT-2 style: the text is the lossy UTF-8 decoding of
  concatenated bytes, so text that does not end in U+FFFD never changes when tokens are added).
- ``_WindowText``: the prefix/read-offset window over ``decode`` (vLLM's algorithm) for every other
  tokenizer: SentencePiece-style decoders with byte fallback (InternLM2, Llama, Phi-3), and slow
  (Python) tokenizers. It decodes ``ids[prefix:]`` and hands out what follows the text of
  ``ids[prefix:read]``; the window then moves to ``ids[read:]``, tokens that produced text, so a
  decoder that strips the first space of its input (Metaspace, ``Strip``) strips it from the prefix
  and the new text alike. It uses the Rust tokenizer's own ``decode`` where there is one, else the
  tokenizer's. Two rules:

  * A window whose text ends in U+FFFD is an incomplete character: nothing is handed out yet.
  * Byte-fallback tokens (``<0xE4>``) are decoded only once their run has ended: a run is decoded as
    a whole (one invalid byte turns the whole run into U+FFFD), so text from inside a run could
    change. A token that ``decode`` drops (a skipped special token, an id outside the vocabulary) does
    not end a run: ``decode`` joins the bytes on either side of it. (DecodeStream hands out text from
    inside a run, and raises when the run then turns out invalid: it is not used for byte fallback.)

Text that could be the beginning of a stop string is held back (at most the longest stop string's
length minus one character); a stop string is searched for only in that held-back text plus the new
text, and when one appears the text is cut before it (``stopped``). Neither the held-back text nor
the search grows with the length of the output.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what decode makes of an incomplete or invalid UTF-8 sequence


@dataclass(frozen=True)
class TokenizerFacts:
    """What the detokenizer needs to know of a tokenizer, found once per tokenizer."""

    decode: Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text
    byte_ids: frozenset[int]  # byte-fallback tokens, ``<0xE4>``
    dropped_ids: frozenset[int]  # ids decode may drop (added and special tokens, holes in the ids)
    max_id: int  # ids above are dropped by decode too
    backend: object | None  # the ``tokenizers.Tokenizer`` when DecodeStream is exact for it

    def maybe_dropped(self, token_id: int) -> bool:
        return token_id > self.max_id or token_id in self.dropped_ids


_facts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> TokenizerFacts
_facts_lock = threading.Lock()


def tokenizer_facts(tokenizer) -> TokenizerFacts:
    """``tokenizer``'s facts; its vocabulary is scanned once, whatever the number of requests."""
    with _facts_lock:
        found = _facts.get(tokenizer)
        if found is None:
            found = _facts[tokenizer] = _find_facts(tokenizer)
        return found


def byte_token_ids(tokenizer) -> frozenset[int]:
    """The ids of ``tokenizer``'s byte-fallback tokens (``<0xE4>``)."""
    return tokenizer_facts(tokenizer).byte_ids


def _find_facts(tokenizer) -> TokenizerFacts:
    vocab = tokenizer.get_vocab()
    ids = set(vocab.values())
    max_id = max(ids, default=-1)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    added.update(getattr(tokenizer, "all_special_ids", []) or [])
    holes = set(range(max_id + 1)) - ids
    rust = _rust_backend(tokenizer)
    if rust is not None:

        def decode(token_ids: list[int], skip: bool) -> str:
            return rust.decode(token_ids, skip_special_tokens=skip)
    else:

        def decode(token_ids: list[int], skip: bool) -> str:
            return tokenizer.decode(token_ids, skip_special_tokens=skip)

    return TokenizerFacts(
        decode=decode,
        byte_ids=frozenset(
            i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
        ),
        dropped_ids=frozenset(added | holes),
        max_id=max_id,
        backend=rust if rust is not None and _is_byte_level(rust) else None,
    )


def _rust_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` whose ``decode`` equals ``tokenizer.decode``, or None.

    transformers may clean spaces up after the Rust decode (``clean_up_tokenization_spaces``): such a
    tokenizer is decoded through its own ``decode``."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer) or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend


def _is_byte_level(backend) -> bool:
    from tokenizers import decoders

    return isinstance(backend.decoder, decoders.ByteLevel)


# -- the sources of text --------------------------------------------------------------------------


class _StreamText:
    """``DecodeStream`` over a byte-level decoder. The tokens since its last text are kept so that
    the end of a request can decode them: the text before them ends on a whole character, and bytes
    are independent of their neighbours in a byte-level decoder, so their own text is the rest."""

    def __init__(self, facts: TokenizerFacts, skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.facts, self.skip = facts, skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.unread: list[int] = []

    def add(self, token_ids: list[int]) -> str:
        self.unread.extend(token_ids)
        arg = token_ids[0] if len(token_ids) == 1 else list(token_ids)
        text = self.stream.step(self.facts.backend, arg)
        if text is None:
            return ""
        self.unread.clear()
        return text

    def flush(self) -> str:
        return self.facts.decode(self.unread, self.skip) if self.unread else ""


class _WindowText:
    """The prefix/read-offset window over ``decode``; the module docstring has its rules."""

    def __init__(self, facts: TokenizerFacts, skip_special_tokens: bool):
        self.facts, self.skip = facts, skip_special_tokens
        self.window: list[int] = []  # ids[prefix_offset:]
        self.read = 0  # read_offset - prefix_offset: the window's tokens whose text is handed out
        self.prefix_text = ""  # the text of window[:read]
        self.in_byte_run = False

    def add(self, token_ids: list[int]) -> str:
        self.window.extend(token_ids)
        if self.facts.byte_ids:
            for t in token_ids:
                if not self.facts.maybe_dropped(t):
                    self.in_byte_run = t in self.facts.byte_ids
        if self.in_byte_run:
            return ""
        full = self.facts.decode(self.window, self.skip)
        prefix = self.prefix_text
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT) or not full.startswith(prefix):
            return ""
        self.window = self.window[self.read :]  # the tokens just read: the next step's prefix
        self.prefix_text = self.facts.decode(self.window, self.skip)
        self.read = len(self.window)
        return full[len(prefix) :]

    def flush(self) -> str:
        full = self.facts.decode(self.window, self.skip)
        return full[len(self.prefix_text) :]


class IncrementalDetokenizer:
    """One request's text: ``add`` new tokens, get the text that may be emitted now; ``finish`` at the
    end. ``stopped`` is set when a stop string appears (the text handed out ends before it)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None):
        facts = tokenizer_facts(tokenizer)
        source = _StreamText if facts.backend is not None else _WindowText
        self.source: _StreamText | _WindowText = source(facts, skip_special_tokens)
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self._stop_starts = frozenset(s[0] for s in self.stop)
        self.held = ""  # decoded text not handed out: it could be the beginning of a stop string
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that may be emitted now. Sets ``stopped`` on a stop string."""
        if self.stopped or not token_ids:
            return ""
        new = self.source.add(token_ids)
        if not self.stop or not new:
            return new
        text = self.held + new
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = self._held_back(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> str:
        """The rest of the text at the end of the request (nothing after a stop string). Text that
        only the end completes (a last byte-fallback run, a last invalid byte) is searched for stop
        strings too: it may set ``stopped``."""
        if self.stopped:
            return ""
        rest = self.source.flush()
        text, self.held = self.held + rest, ""
        cut = self._find_stop(text) if self.stop and rest else None
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def _find_stop(self, text: str) -> int | None:
        """Where the first stop string in ``text`` begins. Text before ``held`` cannot begin one: it
        would have been held back."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            if text[-n] in self._stop_starts and any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
