"""The decoder service core: InternVL's language model behind a continuous-batching engine.

Domain API (what the servicer calls; nothing here knows gRPC or Ray)::

    from services.decoder import DecoderConfig, DecoderCore, GenerateInput, ImageEmbedding, SamplingParams

    core = DecoderCore(DecoderConfig(model="/path/to/checkpoint"))      # or DecoderCore.from_checkpoint(path)
    async for event in core.generate(GenerateInput(
        request_id="r1",
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        images=[ImageEmbedding(embeddings=tensor_of_shape_tiles_x_256_by_hidden, tiles=1, content_hash="...")],
        sampling=SamplingParams(temperature=0.0, stop=["\\n\\n"], logprobs=2),
        max_tokens=128, cache_namespace="tenant-a", priority=0, deadline=time.monotonic() + 30,
    )):
        event.text, event.token_ids, event.logprobs       # a delta (never broken UTF-8)
        event.finish_reason, event.usage                  # set on the last event only

    core.abort("r1")                                      # or close the async iterator
    core.count_tokens(messages, image_tiles=[1]) -> (total_tokens, image_tokens)
    core.shutdown()

The engine (scheduler, model steps, tensor-parallel ranks) runs in a process of its own by default
(``DecoderConfig.engine_process``; ``False``: a thread of the caller's process). That process is started
with ``spawn``, so a script that builds a ``DecoderCore`` at import time needs the usual
``if __name__ == "__main__":`` guard.

``finish_reason`` is a ``FinishReason`` (``STOP``, ``LENGTH``, ``CANCELLED``, ``DEADLINE``, ``ERROR``);
``usage`` has ``prompt_tokens``, ``image_tokens`` and ``completion_tokens``; the first event carries
``prompt_tokens`` and ``image_tokens`` too. Bad input (a prompt past the context,
placeholders that do not match the images, out-of-range ``max_tokens`` or sampling values) raises
``services.common.errors.InvalidArgument`` when the iterator is first advanced.

The service boundary above the core (``server.DecoderFrontend``) takes a ``DecodeRequest`` (typed chat
messages, ``SamplingParams``, ``max_tokens``) with its embedding references and ``RequestContext``, and
yields the same ``GenerationEvent`` s with the token strings of their log-probabilities filled in; Ray
handles carry these objects as they are, and ``pb`` converts them for gRPC.

Layout: ``config`` (pydantic configs), ``types`` (the API types above and the hop's), ``pb`` (their
protobuf conversions), ``prompting`` (chat template,
safe tokenization, image placeholders), ``engine/`` (pure-Python scheduler and block manager; the model
runner, sampler, detokenizer and output processor, tensor-parallel workers, the sync ``LLMEngine``, the
loop that drives it on a thread or in its own process, and ``DecoderCore``),
``models/`` (one decoder LM for the Qwen2 / Qwen3 / Llama / Phi-3 families, Megatron-sharded layers),
``attention/`` (paged torch and flash-attn backends behind a registry).

Imports are lazy so that the pure modules load without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChatMessage",
    "DecodeRequest",
    "DecoderConfig",
    "DecoderCore",
    "FinishReason",
    "GenerateInput",
    "GenerationEvent",
    "ImageEmbedding",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
]

_LAZY = {
    "ChatMessage": "services.decoder.types",
    "DecodeRequest": "services.decoder.types",
    "FinishReason": "services.decoder.types",
    "DecoderConfig": "services.decoder.config",
    "DecoderCore": "services.decoder.engine.async_engine",
    "GenerateInput": "services.decoder.types",
    "GenerationEvent": "services.decoder.types",
    "ImageEmbedding": "services.decoder.types",
    "TokenLogprob": "services.decoder.types",
    "Usage": "services.decoder.types",
    "SamplingParams": "services.decoder.engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
