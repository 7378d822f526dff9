"""Per-request sampling parameters and their bounds (pure Python, no torch).

Bounds are deliberately generous but finite: a value outside them is a caller bug (or an attack on
the step time), and is rejected with ``InvalidArgument`` before the request reaches the scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument
from services.decoder.engine.response_format import ResponseFormat, check_logit_bias

MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
MAX_REPETITION_PENALTY = 10.0
MAX_ABS_OPENAI_PENALTY = 2.0
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = (1 << 63) - 1


@dataclass
class SamplingParams:
    """How to pick each next token of one request.

    ``temperature == 0`` (or ``top_k == 1``) is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``repetition_penalty`` is the CTRL/transformers rule over prompt and output tokens;
    ``frequency_penalty`` / ``presence_penalty`` are OpenAI's additive rules over output tokens.
    ``logprobs``: ``None`` for none, ``k >= 0`` for the chosen token's log-probability plus ``k``
    top alternatives (from the model's distribution before temperature and filters).
    ``response_format`` constrains the output to JSON (``response_format``); ``logit_bias`` adds a bias to
    the logits of some token ids before temperature and filters.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def needs_host_state(self) -> bool:
        """A grammar constrains this request: its next token's mask needs the previous token consumed on
        the host, so its row cannot be sampled before the previous step's token is known."""
        return self.response_format is not None

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        def finite(name: str, value: float) -> float:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if not 0.0 <= finite("temperature", self.temperature) <= MAX_TEMPERATURE:
            raise InvalidArgument(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if not 0.0 < finite("top_p", self.top_p) <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument(
                f"top_k must be an integer in [-1, {MAX_TOP_K}] (0 or -1: off), got {self.top_k}"
            )
        if not 0.0 < finite("repetition_penalty", self.repetition_penalty) <= MAX_REPETITION_PENALTY:
            raise InvalidArgument(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {self.repetition_penalty}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if abs(finite(name, getattr(self, name))) > MAX_ABS_OPENAI_PENALTY:
                raise InvalidArgument(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidArgument(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidArgument(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                raise InvalidArgument(
                    f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters, got {s!r}"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise InvalidArgument(f"stop token id {t!r} is outside the vocabulary (size {vocab_size})")
        self.logit_bias = check_logit_bias(self.logit_bias, vocab_size)
        if self.response_format is not None:
            self.response_format.validate()
        return self
