"""Paged KV-cache bookkeeping with prefix caching (pure Python, no torch).

The cache is ``num_blocks`` blocks of ``block_size`` token slots. The manager only hands out block
ids and counts references; the model runner owns the tensors the ids index.

Prefix caching: a full block is identified by a hash chain over everything that determines its KV
content: the parent block's hash, the block's token ids, and for image context tokens (identical ids
whatever the picture) the image's content hash and the offset inside the image. The chain starts from
the tenant's cache namespace, so two tenants never share a block: a prefix hit is a timing side
channel, like an embedding-cache hit. A block is registered only after its KV has been written
(``cache_computed_blocks``), never at allocation, so a preempted or aborted step cannot leave a hash
pointing at garbage.

Freed blocks keep their hash and wait in the free queue (``free_queue.py``); allocation takes blocks
that hold nothing first and only then evicts a cached one, forgetting its hash, so a freed prefix stays
reusable until its memory is needed. Which cached block goes first: with fair share, the least recently
freed of the tenant furthest over its share of the cache (blocks held and cached per unit of weight);
without it, the least recently freed.
"""

from __future__ import annotations

import hashlib

from services.decoder.engine.free_queue import FreeQueue
from services.decoder.engine.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def namespace_root_hash(namespace: str) -> bytes:
    return hashlib.sha256(b"internvl-mesh/kv/" + namespace.encode("utf-8")).digest()


def hash_block(parent: bytes, token_ids: list[int], extra: tuple[tuple[str, int], ...]) -> bytes:
    h = hashlib.sha256(parent)
    h.update(len(token_ids).to_bytes(4, "little"))
    for t in token_ids:
        h.update(t.to_bytes(4, "little", signed=False))
    for content_hash, offset in extra:
        h.update(b"\x00img\x00" + content_hash.encode("utf-8") + offset.to_bytes(8, "little"))
    return h.digest()


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, fair_share: bool = True
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_queue = FreeQueue(num_blocks, fair=fair_share)  # eviction per tenant with fair share
        self.hash_to_block: dict[bytes, int] = {}
        # statistics for metrics and tests
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- views -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.block_size)

    # -- hashing ---------------------------------------------------------------------------------
    def update_block_hashes(self, req: Request) -> None:
        """Extend ``req.block_hashes`` to cover every full block of its known tokens (not the
        placeholders of a running step, which come last)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = (req.num_tokens - req.num_pending) // bs
        while len(req.block_hashes) < n_full:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else namespace_root_hash(req.cache_namespace)
            start, end = i * bs, (i + 1) * bs
            extra = tuple(
                (span.content_hash, max(start, span.offset) - span.offset)
                for span in req.images
                if span.offset < end and start < span.offset + span.length
            )
            req.block_hashes.append(hash_block(parent, req.all_token_ids[start:end], extra))

    # -- allocation ------------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Cached blocks for the longest prefix of ``req`` (and how many tokens they hold).

        At least one token is always left to compute: the step that computes it yields the logits
        the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self.update_block_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def can_allocate(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        total = req.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_needed(total) - len(req.block_ids) - len(computed_blocks)
        # cached blocks that sit in the free queue stop being free once touched
        touched_free = sum(1 for b in computed_blocks if self.ref_cnt[b] == 0)
        return max(needed, 0) + touched_free <= self.num_free_blocks

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Give ``req`` blocks for ``num_new_tokens`` more tokens (after ``computed_blocks``); False if full."""
        if not self.can_allocate(req, num_new_tokens, computed_blocks):
            return False
        for block_id in computed_blocks:
            if self.ref_cnt[block_id] == 0:
                self.free_queue.take(block_id, req.tenant, req.weight)
            self.ref_cnt[block_id] += 1
            req.block_ids.append(block_id)
        if computed_blocks:
            req.num_hashed_cached_blocks = len(req.block_ids)
        total = req.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        for _ in range(self.blocks_needed(total) - len(req.block_ids)):
            block_id = self.free_queue.pop(req.tenant, req.weight)
            old_hash = self.block_hash[block_id]
            if old_hash is not None:
                if self.hash_to_block.get(old_hash) == block_id:
                    del self.hash_to_block[old_hash]
                self.block_hash[block_id] = None
            self.ref_cnt[block_id] = 1
            req.block_ids.append(block_id)
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the full blocks whose KV is now written (call after ``num_computed_tokens`` grew)."""
        if not self.enable_prefix_caching:
            return
        self.update_block_hashes(req)
        n_full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes), len(req.block_ids))
        for i in range(req.num_hashed_cached_blocks, n_full):
            block_id, block_hash = req.block_ids[i], req.block_hashes[i]
            if self.block_hash[block_id] is None:
                self.block_hash[block_id] = block_hash
                self.hash_to_block.setdefault(block_hash, block_id)
        req.num_hashed_cached_blocks = max(req.num_hashed_cached_blocks, n_full)

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks; the tail of its sequence becomes the first to be evicted."""
        for block_id in reversed(req.block_ids):
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if self.ref_cnt[block_id] == 0:
                self.free_queue.release(block_id, cached=self.block_hash[block_id] is not None)
        req.block_ids = []
        req.num_hashed_cached_blocks = 0
