"""One generation request as the scheduler sees it (pure Python, no torch).

The request carries its token ids (prompt, then output), how many of them have KV in the cache
(``num_computed_tokens``), the KV blocks it holds, and the image spans of its prompt. Image embedding
tensors ride along as an opaque payload (``mm_embeddings``) that only the model runner reads.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Any

from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import FinishReason

_arrival_counter = itertools.count()

# An output token sampled by a step that is still running: its value is on the device until the step
# is resolved (overlapped scheduling, ``Scheduler.advance``), and it is the next step's input there.
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = FinishReason.STOP
    FINISHED_LENGTH = FinishReason.LENGTH
    FINISHED_ABORTED = FinishReason.CANCELLED
    FINISHED_DEADLINE = FinishReason.DEADLINE
    FINISHED_ERROR = FinishReason.ERROR

    @property
    def finished(self) -> bool:
        return isinstance(self.value, FinishReason)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.value if self.finished else None


@dataclass(frozen=True)
class ImageSpan:
    """An image's run of context tokens in the prompt: positions ``[offset, offset + length)``."""

    offset: int
    length: int
    content_hash: str


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        images: list[ImageSpan] | None = None,
        mm_embeddings: Any = None,
        cache_namespace: str = "",
        priority: int = 0,
        arrival_time: float = 0.0,
        deadline: float | None = None,
        tenant: str = "",
        weight: float = 1.0,
        max_kv_share: float | None = None,
        grammar: Any = None,
        prefix_group: str | None = None,
    ):
        if not prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.images = list(images or [])
        self.mm_embeddings = mm_embeddings
        self.cache_namespace = cache_namespace
        self.priority = priority
        self.arrival_time = arrival_time
        self.arrival_seq = next(_arrival_counter)
        self.deadline = deadline
        self.tenant = tenant
        if not weight > 0:
            raise ValueError(f"a request's weight must be positive, got {weight!r}")
        self.weight = weight
        self.max_kv_share = max_kv_share  # fraction of the KV blocks its tenant's requests may hold
        self.waiting_since = arrival_time  # the scheduler sets it when the request (re)joins the queue
        self.starved = False  # waited the scheduler's max_wait_s: served above every priority
        # ``engine.structured.Grammar`` when a response format constrains the output: the scheduler
        # advances it with every token it appends, the sampler masks the row's logits with it.
        self.grammar = grammar
        # The samples of one request (``n`` > 1) share a group: they share the prompt, which one of them
        # prefills while the others wait to find it in the prefix cache (``engine.siblings``).
        self.prefix_group = prefix_group

        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first scheduling; -1 until then
        self.num_preemptions = 0
        self.num_pending = 0  # output tokens appended as PLACEHOLDER, their step not yet resolved
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the full blocks of all_token_ids, in order
        self.num_hashed_cached_blocks = 0  # leading blocks already registered in the prefix cache

    def __getstate__(self) -> dict[str, Any]:
        """What crosses to an engine process: all but the grammar, which is compiled again there from
        ``sampling_params.response_format`` (a matcher is this process's object)."""
        state = self.__dict__.copy()
        state["grammar"] = None
        return state

    # -- views -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def num_image_tokens(self) -> int:
        return sum(span.length for span in self.images)

    @property
    def needs_sync(self) -> bool:
        """Its next token's mask depends on its previous token (a grammar): the step that samples it
        must wait for the previous step's tokens on the host."""
        return self.grammar is not None

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: higher ``priority`` first, then earlier arrival."""
        return (-self.priority, self.arrival_time, self.arrival_seq)

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
