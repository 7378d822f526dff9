"""Shared prefill for the samples of one request (``n`` > 1): the sibling gate (pure Python, no torch).

The samples of a request are separate requests to the scheduler with the same prompt, the same images
and the same ``prefix_group``. Admitted together, each would prefill the whole prompt. The gate admits
one of them (the leader: the first the scheduler reaches) and holds the others back while a request of
the group runs whose prompt is not yet in the prefix cache. Once the leader's prompt blocks are
registered (``BlockManager.cache_computed_blocks``, when its prefill step is resolved) the siblings
are admitted and find every full block of the prompt in the cache; each computes only the last,
partial block (at least one token is always computed: its logits give the first output token).

Nothing is held for good: the gate waits only on a *running* request, which either caches its prompt
within its prefill steps, or finishes, or is preempted (and then no longer holds anyone back). With
prefix caching off the gate holds no one: each sample prefills its own prompt.
"""

from __future__ import annotations

from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.request import Request, RequestStatus


class SiblingGate:
    def __init__(self, block_manager: BlockManager):
        self.block_manager = block_manager
        self.groups: dict[str, list[Request]] = {}  # prefix group -> its unfinished requests

    def add(self, req: Request) -> None:
        if req.prefix_group is not None:
            self.groups.setdefault(req.prefix_group, []).append(req)

    def remove(self, req: Request) -> None:
        members = self.groups.get(req.prefix_group) if req.prefix_group is not None else None
        if members is None:
            return
        members[:] = [r for r in members if r is not req]
        if not members:
            del self.groups[req.prefix_group]

    def holds(self, req: Request) -> bool:
        """``req`` waits: a sibling is running whose prompt is not in the prefix cache yet."""
        if req.prefix_group is None or not self.block_manager.enable_prefix_caching:
            return False
        return any(
            other is not req and other.status == RequestStatus.RUNNING and not self.prompt_cached(other)
            for other in self.groups.get(req.prefix_group, ())
        )

    def prompt_cached(self, req: Request) -> bool:
        """Every prompt block a sibling can take from the cache is registered there."""
        shareable = (req.num_prompt_tokens - 1) // self.block_manager.block_size
        return req.num_hashed_cached_blocks >= shareable
