"""Incremental detokenisation and stop strings.

Text is produced from a sliding window of tokens (``prefix_offset:read_offset``) so each step decodes a
few tokens, not the whole output. A window whose text ends in U+FFFD is an incomplete UTF-8 sequence
(a multi-byte character split over tokens): nothing is emitted until the next token completes it.

Byte-fallback tokens (``<0xE4>``, SentencePiece tokenizers) are decoded only once their run has
ended: a run is re-interpreted as a whole (an invalid byte turns its neighbours into U+FFFD too), so
text from the middle of a run could differ from the final decoding.

Text that could be the beginning of a stop string is held back; when a stop string appears, the text
is cut before it. When a request ends any other way, the remaining text is taken from decoding all
output tokens at once, so the streamed deltas always add up to exactly that.

What the detokenizer needs from the vocabulary (its byte-fallback ids) is found by one scan per
tokenizer, shared by every request (``byte_token_ids``): a request's admission costs nothing that
grows with the vocabulary.
"""

from __future__ import annotations

import threading
import weakref

_byte_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> frozenset[int]
_byte_ids_lock = threading.Lock()


def byte_token_ids(tokenizer) -> frozenset[int]:
    """The ids of ``tokenizer``'s byte-fallback tokens (``<0xE4>``); its vocabulary is scanned once."""
    with _byte_ids_lock:
        found = _byte_ids.get(tokenizer)
        if found is None:
            found = frozenset(
                i
                for t, i in tokenizer.get_vocab().items()
                if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            )
            _byte_ids[tokenizer] = found
        return found


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded text so far (complete characters only)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._byte_ids = byte_token_ids(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that may be emitted now. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        if self.token_ids and self.token_ids[-1] in self._byte_ids:
            return self._take(len(self.text) - self._held_back())  # inside a byte run: wait for its end
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            checked_from = max(0, len(self.text) - self.max_stop_len + 1)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            if self.stop and self._find_stop(checked_from):
                return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The rest of the text at the end of the request (not called after a stop string)."""
        if self.stopped:
            return ""
        complete = self._decode(self.token_ids)
        if complete.startswith(self.text[: self.emitted]):
            self.text = complete
        return self._take(len(self.text))

    def _find_stop(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self.max_stop_len - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
