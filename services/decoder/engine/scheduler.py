"""The continuous-batching scheduler: one token-budget loop (pure Python, no torch).

Every step each request's computed tokens catch up with its known tokens, within a budget of
``max_num_batched_tokens``. A request that is new, preempted or halfway through a long prompt simply
has many tokens to catch up (prefill, chunked when the budget is short); a running request has one
(decode). So chunked prefill, decode and recompute-after-preemption are the same code path.

The order in which the budget is spent, and whom a preemption takes, is the policy of ``fair_share.py``:
by default weighted fair share between tenants within strict priority classes (with a bound on how long
a lower class waits); with ``fair_share`` off, priority (higher first) then arrival, running requests
before waiting ones. When blocks run out for a running request, a running request is preempted by
recompute (off: the lowest-priority latest; on: of the lowest class, the tenant furthest over its share
of KV blocks): its blocks are freed and it goes back to the waiting queue with its output tokens, to be
prefilled again (from the prefix cache, often). A waiting request may also preempt running requests of
strictly lower priority, and with fair share those of a tenant over its share.

Contract with the engine: ``schedule() -> SchedulerOutput``; the runner executes it; then
``update_from_output(scheduler_output, sampled_token_ids)`` advances the requests and reports which
finished. Deadlines use an injectable clock so tests need no sleeps.

Overlapped scheduling splits that update in two. ``advance`` runs as soon as a step is launched: its
chunks count as computed, and each request that samples gets a ``PLACEHOLDER`` output token, so the
next step can be scheduled while this one runs (its decode input is the placeholder, which the model
runner takes from the running step's sampled ids on the device). ``resolve`` runs when the step's
tokens reach the host: placeholders get their values, blocks are registered in the prefix cache, stop
conditions are checked. A request whose token ends it by length gets no placeholder (it will not run
again); one that ends by a stop token has run one step too many, whose token is dropped. A preempted
request waits to be prefilled again until its placeholder is resolved.

The samples of one request (``n`` > 1, one ``prefix_group``) prefill their shared prompt once: a
sibling waits while another runs whose prompt is not yet in the prefix cache (``siblings.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.fair_share import FairShare, StepQueues
from services.decoder.engine.request import PLACEHOLDER, Request, RequestStatus
from services.decoder.engine.siblings import SiblingGate


@dataclass
class SchedulerLimits:
    """The subset of the scheduler configuration the loop reads (kept free of pydantic)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    fair_share: bool = True  # weighted fair share between tenants (``fair_share.py``); off: priority, arrival
    max_wait_s: float = 30.0  # with fair share, a request waiting this long is served above every priority


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start`` run this step."""

    request: Request
    start: int
    num_tokens: int
    sample: bool  # this chunk reaches the last known token: its logits give the next token
    token_index: int | None = None  # where ``advance`` put the placeholder of the sampled token


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # ended before running (deadline)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class _Step:
    """The state of one ``schedule`` call."""

    out: SchedulerOutput
    budget: int
    queues: StepQueues
    now: float
    scheduled: dict[str, ScheduledChunk] = field(default_factory=dict)
    short: bool = False  # a running request had to preempt for blocks


@dataclass
class RequestUpdate:
    """What one step did to one request (only requests that sampled or finished appear)."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        block_manager: BlockManager,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits = limits
        self.block_manager = block_manager
        self.clock = clock
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.policy = FairShare(limits.fair_share, limits.max_wait_s, block_manager.num_blocks)
        self.siblings = SiblingGate(block_manager)

    # -- queue management ------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request {req.request_id!r} is already scheduled")
        needed = self.block_manager.blocks_needed(req.num_prompt_tokens + req.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request {req.request_id!r} needs {needed} KV blocks, the cache has {self.block_manager.num_blocks}"
            )
        cap = self.policy.kv_cap(req)
        if cap is not None and needed > cap:
            raise ValueError(
                f"request {req.request_id!r} needs {needed} KV blocks, its tenant's max_kv_share allows {cap}"
            )
        req.status = RequestStatus.WAITING
        req.waiting_since = self.clock()
        self.policy.note(req)
        self.siblings.add(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request now (abort, stop string, deadline, error) and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.free(req)
        self.siblings.remove(req)
        req.status = status
        return req

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def tenant_stats(self) -> dict[str, dict[str, float]]:
        """Per tenant: tokens, admissions, queue seconds, passed over, running, waiting, KV blocks."""
        return self.policy.stats(self.running, self.waiting)

    # -- the step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._expire_deadlines(out)
        now = self.clock()
        self.running.sort(key=Request.sort_key)
        self.waiting.sort(key=Request.sort_key)
        step = _Step(
            out,
            self.limits.max_num_batched_tokens,
            self.policy.begin_step(self.running, self.waiting, now),
            now,
        )
        while step.budget > 0:
            item = step.queues.pop()
            if item is None:
                break
            req, was_running = item
            if was_running:
                if req.status == RequestStatus.RUNNING:  # not preempted earlier in this step
                    self._schedule_running(req, step)
            elif not step.short:
                self._schedule_waiting(req, step)
        out.chunks = list(step.scheduled.values())
        return out

    def _schedule_running(self, req: Request, step: _Step) -> None:
        num_new = min(req.num_tokens - req.num_computed_tokens, step.budget)
        if num_new <= 0:
            return
        cap = self.policy.kv_cap(req)
        while cap is not None and self._held_after(req, req.num_computed_tokens + num_new) > cap:
            victim = self.policy.own_latest(req, self.running)
            self._evict(victim, step)
            if victim is req:
                return
        while not self.block_manager.allocate_slots(req, num_new):
            victim = self.policy.running_victim(req, self.running, step.now)
            self._evict(victim, step)
            step.short = True  # blocks ran out: no waiting request is admitted this step
            if victim is req:
                return
        self._add_chunk(req, num_new, step)

    def _schedule_waiting(self, req: Request, step: _Step) -> None:
        group = self.policy.group(req)
        if req.num_pending:
            step.queues.drop_waiting(group)  # preempted while its step ran: its last token is not known yet
            return
        if self.siblings.holds(req):
            return  # a sibling is prefilling the shared prompt: this one will find it in the cache
        while len(self.running) >= self.limits.max_num_seqs:
            victim = self.policy.admission_victim(req, self.running, step.now, slots=True)
            if victim is None:
                return step.queues.drop_waiting(group)
            self._evict(victim, step)
        computed_blocks, num_cached = self.block_manager.get_computed_blocks(req)
        num_new = req.num_tokens - num_cached
        if not self.limits.enable_chunked_prefill and num_new > step.budget:
            return step.queues.drop_waiting(group)
        num_new = min(num_new, step.budget)
        cap = self.policy.kv_cap(req)
        if cap is not None and self._held_after(req, num_cached + num_new) > cap:
            return step.queues.drop_waiting(group)
        while not self.block_manager.allocate_slots(req, num_new, computed_blocks):
            need = self.block_manager.blocks_needed(num_cached + num_new)
            victim = self.policy.admission_victim(req, self.running, step.now, slots=False, need=need)
            if victim is None:
                return step.queues.drop_waiting(group)
            self._evict(victim, step)
            computed_blocks, num_cached = self.block_manager.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_cached, step.budget)
        self.waiting.remove(req)
        self.policy.admit(req, self.waiting, step.now)
        req.num_computed_tokens = num_cached
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._add_chunk(req, num_new, step)

    def _held_after(self, req: Request, num_tokens: int) -> int:
        """KV blocks ``req``'s tenant holds once ``req`` has blocks for ``num_tokens`` tokens."""
        held = self.policy.blocks_held(self.policy.group(req), self.running)
        own = len(req.block_ids) if req.status == RequestStatus.RUNNING else 0
        return held - own + self.block_manager.blocks_needed(num_tokens)

    def _add_chunk(self, req: Request, num_new: int, step: _Step) -> None:
        step.scheduled[req.request_id] = self._chunk(req, num_new)
        step.budget -= num_new
        self.policy.charge(req, num_new)

    def _evict(self, victim: Request, step: _Step) -> None:
        """Preempt ``victim``; a chunk it had in this step is dropped and refunded."""
        chunk = step.scheduled.pop(victim.request_id, None)
        if chunk is not None:
            step.budget += chunk.num_tokens
            self.policy.charge(victim, -chunk.num_tokens)
        self._preempt(victim, step.out)

    def _chunk(self, req: Request, num_new: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req, start, num_new, sample=start + num_new == req.num_tokens)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Preempt by recompute: drop the KV, keep the tokens, queue again at the front of its class."""
        self.running.remove(req)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.waiting_since = self.clock()
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        out.preempted.append(req)

    def _expire_deadlines(self, out: SchedulerOutput) -> None:
        now = self.clock()
        for req in [r for r in self.requests.values() if r.deadline is not None and r.deadline <= now]:
            self.finish_request(req.request_id, RequestStatus.FINISHED_DEADLINE)
            out.finished.append(req)

    # -- after the step ----------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[RequestUpdate]:
        """Advance the scheduled requests; ``sampled_token_ids`` follow the sampling chunks' order."""
        self.advance(out)
        return self.resolve(out, sampled_token_ids)

    def advance(self, out: SchedulerOutput) -> None:
        """The step is launched: its tokens count as computed, its samples as placeholders."""
        for chunk in out.chunks:
            req = chunk.request
            if req.is_finished:
                continue
            req.num_computed_tokens += chunk.num_tokens
            if chunk.sample and not self._ends_by_length(req, req.num_output_tokens + 1):
                chunk.token_index = req.num_tokens
                req.append_output_token(PLACEHOLDER)
                req.num_pending += 1

    def resolve(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[RequestUpdate]:
        """The step's sampled tokens are known: place them, cache full blocks, end what stops."""
        updates: list[RequestUpdate] = []
        sampled = iter(sampled_token_ids)
        for chunk in out.chunks:
            req = chunk.request
            token = next(sampled) if chunk.sample else None
            if req.is_finished:
                continue  # ended while the step ran (abort, deadline, or a stop in an earlier step)
            index = chunk.token_index
            if index is not None:
                req.all_token_ids[index] = token
                req.num_pending -= 1
            elif token is not None:
                index = req.num_tokens
                req.append_output_token(token)
            if req.status == RequestStatus.RUNNING:
                self.block_manager.cache_computed_blocks(req)
            if token is None:
                continue
            # the outputs up to this token: a later step may already have put its placeholder after it
            status = self._stop_status(req, token, index + 1 - req.num_prompt_tokens)
            if status is not None:
                del req.all_token_ids[index + 1 :]  # a later step's placeholder: that step is dropped
                req.num_pending = 0
                self.finish_request(req.request_id, status)
            updates.append(RequestUpdate(req, [token], status is not None))
        return updates

    def _ends_by_length(self, req: Request, num_output_tokens: int) -> bool:
        return num_output_tokens >= req.max_tokens or req.num_prompt_tokens + num_output_tokens >= (
            self.limits.max_model_len
        )

    def _stop_status(self, req: Request, token: int, num_output_tokens: int) -> RequestStatus | None:
        if req.grammar is not None and (ended := req.grammar.advance(token)) is not None:
            return ended  # the grammar refused the token (error), or it ended the document (stop)
        params = req.sampling_params
        if token in params.stop_token_ids or (not params.ignore_eos and token in req.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if self._ends_by_length(req, num_output_tokens):
            return RequestStatus.FINISHED_LENGTH
        return None
