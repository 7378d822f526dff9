"""The embedding cache: where image embeddings are kept between the encoder and the decoder.

- ``store``: the ``EmbeddingStore`` interface, ``StoredEmbedding`` and the manifest that guards it;
- ``memory``: the in-process store (an LRU bounded by bytes);
- ``redis_store``: the shared store in Redis, guarded by a ``circuit_breaker``;
- ``tiered``: the in-process LRU in front of the shared store (what the encoder uses);
- ``resolver``: an embedding reference (cache key, Ray object, inline tensor) to its tensor (the decoder);
- ``errors``: the store's failures (unavailable, full), answered without the cache;
- ``config``: the store settings, and how the mesh-level ``redis`` / ``cache`` settings become them.

Embedding references and the cache-key derivation live in ``services.common.refs``: the gateway, the
encoder and the decoder all share them.
"""
