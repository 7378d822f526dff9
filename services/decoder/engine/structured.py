"""Structured outputs: response formats compiled to grammars and enforced token by token (llguidance).

Three parts, each on its own side of the engine:

- ``GrammarCompiler`` (the caller's side, at admission): compiles a ``ResponseFormat``'s JSON schema into
  an llguidance matcher on a small thread pool, never on the engine thread, and keeps the compiled
  matchers in an LRU keyed by the schema's canonical JSON; a request gets a copy of the cached matcher
  (about a microsecond). A schema the library refuses is ``InvalidArgument`` (``response_format_invalid``)
  with the library's reason. A schema that takes longer to compile than the request's budget (the
  tenant's, at most ``StructuredConfig.max_compile_ms``), waiting in the pool included, is
  ``response_format_too_complex``; the compile goes on and is cached with its duration, so the same
  schema is refused again, from the cache, to a request whose budget is below what it cost. The work of
  one compile is bounded by llguidance's own limits (``LLParserLimits``, "fuel"), so every compile ends.
- ``Grammar`` (one per request, ``Request.grammar``): the request's matcher. The scheduler advances it
  with each token it appends (``Grammar.advance``): a token the grammar refuses ends the request with
  ``error``; once the document is complete the grammar allows only the end-of-sequence tokens, and the
  one sampled ends the request with ``stop``.
- ``fill_bitmask`` (the sampler, through ``logit_constraints``): the next-token masks of a step's
  constrained rows, 32 tokens to an int32, filled by llguidance's executor in one call for the batch.

JSON is generated without free whitespace (``", "`` and ``": "`` between items and keys, nothing else),
so the model cannot spend its tokens on blanks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.decoder.engine.request import RequestStatus
from services.decoder.engine.response_format import REASON_INVALID, REASON_TOO_COMPLEX, ResponseFormat

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_REASON_CHARS = 500  # of the library's message in a refusal


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled schema: the matcher in its initial state (copied per request) and what it cost."""

    matcher: Any  # llguidance.LLMatcher
    compile_ms: float


def _refusal(message: str) -> InvalidArgument:
    message = " ".join(message.split())
    if len(message) > MAX_REASON_CHARS:
        message = message[:MAX_REASON_CHARS] + "..."
    return InvalidArgument(f"response_format: the schema does not compile: {message}", reason=REASON_INVALID)


def _too_complex(budget_ms: int) -> InvalidArgument:
    return InvalidArgument(
        f"response_format: the schema did not compile within {budget_ms} ms; simplify it",
        reason=REASON_TOO_COMPLEX,
    )


class Grammar:
    """One request's grammar: pending until its compile is done (``wait`` or ``ready``), then the
    request's own matcher. Used by the engine thread only once ready."""

    def __init__(self, future: concurrent.futures.Future, budget_ms: int, compiler: GrammarCompiler):
        self._future = future
        self.budget_ms = budget_ms
        self._deadline = time.monotonic() + budget_ms / 1000
        self.compiler = compiler
        self.matcher: Any = None

    def _take(self, compiled: CompiledGrammar) -> None:
        if compiled.compile_ms > self.budget_ms:
            raise _too_complex(self.budget_ms)
        self.matcher = compiled.matcher.deep_copy()

    def done(self) -> bool:
        """``wait`` would return (or raise) at once: compiled, failed, or out of time."""
        return self.matcher is not None or self._future.done() or time.monotonic() >= self._deadline

    def on_done(self, callback) -> None:
        """Call ``callback()`` (on the pool's thread) once the compile has ended."""
        self._future.add_done_callback(lambda _: callback())

    def wait(self) -> None:
        """Block until compiled (a synchronous caller); InvalidArgument if it does not compile in time."""
        if self.matcher is not None:
            return
        try:
            compiled = self._future.result(timeout=max(0.0, self._deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise _too_complex(self.budget_ms) from None
        self._take(compiled)

    async def ready(self) -> None:
        """``wait`` for an asyncio caller: the event loop goes on while the pool compiles."""
        if self.matcher is not None:
            return
        wrapped = asyncio.wrap_future(self._future)
        done, _ = await asyncio.wait([wrapped], timeout=max(0.0, self._deadline - time.monotonic()))
        if not done:
            raise _too_complex(self.budget_ms)
        self._take(wrapped.result())

    def advance(self, token: int) -> RequestStatus | None:
        """Consume the token the scheduler appended: ``error`` if the grammar refuses it, ``stop`` for an
        end-of-sequence token it accepted (the document is complete), else None."""
        if not self.matcher.consume_token(token):
            return RequestStatus.FINISHED_ERROR
        if token in self.compiler.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        return None


class GrammarCompiler:
    """Compiles response formats for one model's tokenizer, off the engine thread, with an LRU cache."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        *,
        cache_size: int = 256,
        compile_threads: int = 1,
        mask_threads: int = 1,
        max_compile_ms: int = 10_000,
        max_schema_bytes: int = 256 * 1024,
    ):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.cache_size = cache_size
        self.max_compile_ms = max_compile_ms
        self.max_schema_bytes = max_schema_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar")
        self._cache: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self._mask_threads = mask_threads
        self._executor: Any = None
        # The tokenizer's token trie takes from milliseconds (1k tokens) to about a second (150k): built
        # on the pool at start-up, before any compile queued behind it.
        self._tokenizer = self._pool.submit(self._build_tokenizer, tokenizer, vocab_size)
        self.stats = {"compiles": 0, "hits": 0}

    @classmethod
    def from_config(
        cls, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], config
    ) -> GrammarCompiler:
        """From ``services.decoder.config.StructuredConfig``."""
        return cls(
            tokenizer,
            vocab_size,
            eos_token_ids,
            cache_size=config.grammar_cache_size,
            compile_threads=config.compile_threads,
            mask_threads=config.mask_threads,
            max_compile_ms=config.max_compile_ms,
            max_schema_bytes=config.max_schema_bytes,
        )

    def _build_tokenizer(self, tokenizer: Any, vocab_size: int):
        import llguidance
        import llguidance.hf

        n_vocab = max(vocab_size, len(tokenizer))  # the model's rows may outnumber the tokenizer's ids
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=sorted(self.eos_token_ids))
        self._executor = llguidance.LLExecutor(num_threads=self._mask_threads)
        return lltok

    @property
    def mask_words(self) -> int:
        """int32 words of one row's token mask."""
        return (self._tokenizer.result().vocab_size + 31) // 32

    @property
    def executor(self) -> Any:
        self._tokenizer.result()
        return self._executor

    def grammar_for(self, fmt: ResponseFormat | None) -> Grammar | None:
        """The request's grammar, its compile started (or found in the cache); None without a format."""
        if fmt is None:
            return None
        fmt.check_size(self.max_schema_bytes)
        budget = min(fmt.max_compile_ms or self.max_compile_ms, self.max_compile_ms)
        return Grammar(self.compile(fmt.grammar_source), budget, self)

    def compile(self, source: str) -> concurrent.futures.Future:
        """The compile of the JSON schema ``source``: the cached one, or a new one on the pool."""
        with self._lock:
            future = self._cache.get(source)
            if future is not None:
                self._cache.move_to_end(source)
                self.stats["hits"] += 1
                return future
            future = self._pool.submit(self._compile, source)
            self._cache[source] = future
            self.stats["compiles"] += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, source: str) -> CompiledGrammar:
        from llguidance import LLMatcher, LLParserLimits

        try:
            tokenizer = self._tokenizer.result()
        except Exception as exc:  # noqa: BLE001 - a tokenizer llguidance cannot read (not a fast one)
            raise InvalidArgument(
                f"response_format is not available for this model's tokenizer ({exc})",
                reason="response_format_unsupported",
            ) from None
        started = time.perf_counter()
        try:
            grammar = LLMatcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise _refusal(str(exc)) from None
        matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=LLParserLimits(verbose_errors=False))
        probe = matcher.deep_copy()
        probe.compute_bitmask()  # what fails only at the first mask fails now
        if probe.is_error():
            raise _refusal(probe.get_error())
        return CompiledGrammar(matcher, (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def fill_bitmask(grammars: list[Grammar]) -> torch.Tensor:
    """(G, W) int32 on the CPU: bit ``t % 32`` of word ``t // 32`` of row ``g`` is set when grammar ``g``
    allows token ``t`` next. One call of llguidance's executor for all rows."""
    compiler = grammars[0].compiler
    words = compiler.mask_words
    mask = torch.empty((len(grammars), words), dtype=torch.int32)
    compiler.executor.unsafe_compute_mask_ptr(
        [(g.matcher, i) for i, g in enumerate(grammars)], mask.data_ptr(), words * 4, len(grammars)
    )
    return mask
