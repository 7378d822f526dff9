"""Prefix-affinity routing of requests to decoder replicas, as a Ray Serve request router.

A decoder replica's KV prefix cache only helps requests that reach the replica holding the prefix. The
router keys each request by the identity the prefix cache uses, never by the prompt text:

- the tenant's cache namespace (a prefix is never shared across namespaces);
- the hash of the prompt before the first image (the system prompt and any text ahead of it);
- the first image's identity (its embedding key: image bytes, tiling, model, namespace).

A request without an image is keyed by its conversation before the question (the last user message);
one with neither an image nor such a prefix has nothing to share and is routed by load alone.

The key picks a replica on a consistent-hash ring (so every gateway replica's router, each with its own
ring built from the same replica set, sends a key to the same decoder, and adding a replica moves only
that replica's share of keys). That replica is preferred unless it is busy: more than
``max_imbalance`` requests ahead of the least-loaded candidate, or full (Serve's own rejection); then
the request goes to the less loaded of two other replicas (power of two choices), and the key's
prefix is rebuilt there. The router runs in the caller's process (the gateway), over the arguments of
``Decoder.generate(request, refs, ctx)``.

Wired through the decoder's deployment options (``request_router_config``) in the rendered Serve config
(mesh/topology.py), so ``serve deploy`` and KubeRay's ``serveConfigV2`` carry it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from services.common.context import RequestContext
from services.common.refs import KIND_INLINE, EmbeddingRef
from services.decoder.types import DecodeRequest, ImagePlaceholder, TextContent

ROUTER_CLASS = "services.decoder.routing:PrefixAffinityRouter"
VIRTUAL_NODES = 64


def _image_identity(ref: EmbeddingRef) -> str:
    """The name the prefix cache files an image under (services.decoder.server._identity), without
    reading an inline tensor's bytes: its sha256 of the image stands in."""
    return f"inline:{ref.image_sha256}" if ref.kind == KIND_INLINE else ref.key


def routing_key(request: DecodeRequest, refs: Sequence[EmbeddingRef], ctx: RequestContext) -> str | None:
    """The request's prefix identity, or None when it has no prefix worth routing on."""
    h = hashlib.blake2b(digest_size=16)
    h.update(ctx.cache_namespace.encode() + b"\x00")
    messages = request.messages
    for message in messages:
        h.update(b"\x01" + message.role.encode() + b"\x00")
        for part in message.content:
            if isinstance(part, ImagePlaceholder):
                if not refs:
                    return None
                h.update(b"\x02" + _image_identity(refs[0]).encode())
                return h.hexdigest()
            if isinstance(part, TextContent):
                h.update(part.text.encode() + b"\x00")
    # No image: the conversation before the question.
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages))
    if last_user == 0:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(ctx.cache_namespace.encode() + b"\x00")
    for message in messages[:last_user]:
        h.update(b"\x01" + message.role.encode() + b"\x00")
        for part in message.content:
            if isinstance(part, TextContent):
                h.update(part.text.encode() + b"\x00")
    return h.hexdigest()


def key_of_args(args: Sequence[Any]) -> str | None:
    """The key of a ``generate(request, refs, ctx)`` call's arguments (None for any other method)."""
    if len(args) != 3 or not isinstance(args[0], DecodeRequest) or not isinstance(args[2], RequestContext):
        return None
    return routing_key(args[0], args[1], args[2])


class HashRing:
    """Replica ids on a ring of ``VIRTUAL_NODES`` points each; ``order(key)`` lists them clockwise from
    the key's point, each once."""

    def __init__(self, ids: Sequence[str] = ()):
        points = sorted(
            (_point(f"{rid}:{i}"), rid) for rid in ids for i in range(VIRTUAL_NODES)
        )  # fmt: skip
        self._hashes = [p for p, _ in points]
        self._ids = [rid for _, rid in points]
        self.members = frozenset(ids)

    def order(self, key: str) -> list[str]:
        if not self._hashes:
            return []
        start = bisect.bisect_right(self._hashes, _point(key))
        seen: list[str] = []
        for i in range(len(self._ids)):
            rid = self._ids[(start + i) % len(self._ids)]
            if rid not in seen:
                seen.append(rid)
                if len(seen) == len(self.members):
                    break
        return seen


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _two_choices(replicas: list[RunningReplica]) -> list[RunningReplica]:
    return random.sample(replicas, 2) if len(replicas) > 2 else list(replicas)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router for the decoder: the key's replica first, load when it is busy.

    Kwargs (``request_router_kwargs``): ``max_imbalance`` (requests the preferred replica may have
    beyond the least-loaded candidate's before the request goes elsewhere, default 8).
    """

    def initialize_state(self, max_imbalance: int = 8, **_: Any) -> None:
        if not isinstance(max_imbalance, int) or max_imbalance < 0:
            raise ValueError(f"max_imbalance must be an int >= 0, got {max_imbalance!r}")
        self._max_imbalance = max_imbalance
        self._ring = HashRing()
        self.affinity_routed = 0
        self.load_routed = 0

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = [r.replica_id.unique_id for r in replicas]
        if frozenset(ids) != self._ring.members:
            self._ring = HashRing(ids)

    def _queue_len(self, replica: RunningReplica) -> int:
        return self._replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = key_of_args(pending_request.args) if pending_request is not None else None
        if key is None:
            return [_two_choices(candidate_replicas)]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[rid] for rid in self._ring.order(key) if rid in by_id]
        if not ranked:
            return [_two_choices(candidate_replicas)]
        primary, rest = ranked[0], ranked[1:]
        least = min(self._queue_len(r) for r in candidate_replicas)
        if self._queue_len(primary) - least > self._max_imbalance and rest:
            self.load_routed += 1
            return [_two_choices(rest), [primary]]
        self.affinity_routed += 1
        return [[primary], _two_choices(rest)] if rest else [[primary]]
