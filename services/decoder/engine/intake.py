"""Request intake: building and validating a request, without the model.

``RequestIntake`` is the one home of admission: prompt building, tokenization, the checks against the
context, the images and the sampling values, and the compile of a response format's grammar (on its
own pool). It holds the checkpoint's config, its tokenizer and prompt builder and the model's plan
(``plan_model``: no weight is read). ``LLMEngine`` admits through its own intake; ``DecoderCore`` with
``engine_process`` keeps one in its process, so a request is validated (and a schema refused) before
anything crosses to the engine process, by the same code whichever mode serves it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.common.checkpoint import Checkpoint
from services.common.errors import InvalidArgument
from services.decoder.config import DecoderConfig
from services.decoder.engine.model_runner import plan_model
from services.decoder.engine.request import Request
from services.decoder.engine.structured import GrammarCompiler
from services.decoder.prompting import load_prompt_builder
from services.decoder.types import GenerateInput


class RequestIntake:
    def __init__(self, config: DecoderConfig, clock: Callable[[], float] = time.monotonic):
        checkpoint = Checkpoint.open(config.model)
        plan = plan_model(config, checkpoint.text_config)
        self.max_model_len = plan.max_model_len
        # Decided once, here: the engine, and every rank's runner, gets the same explicit context length.
        self.config = config.model_copy(
            update={"scheduler": config.scheduler.model_copy(update={"max_model_len": self.max_model_len})}
        )
        self.clock = clock
        self.prompt_builder = load_prompt_builder(checkpoint)
        self.tokenizer = self.prompt_builder.tokenizer
        self.vocab_size = int(checkpoint.text_config["vocab_size"])
        self.eos_token_ids = self._eos_ids(checkpoint)
        self.spec = plan.spec  # the model's widths: an image's embeddings must match its hidden size
        # A response format is compiled here too, off the event loop: a schema that does not compile is
        # refused before the request leaves this process (the engine process compiles its own copy).
        self.grammars = GrammarCompiler.from_config(
            self.tokenizer, self.vocab_size, self.eos_token_ids, config.structured
        )

    def shutdown(self) -> None:
        self.grammars.close()

    def _eos_ids(self, checkpoint: Checkpoint) -> frozenset[int]:
        ids = set()
        gen = checkpoint.read_json("generation_config.json") or {}
        for source in (
            gen.get("eos_token_id"),
            checkpoint.text_config.get("eos_token_id"),
            self.tokenizer.eos_token_id,
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(t) for t in source)
        return frozenset(ids)

    def count_tokens(self, messages, image_tiles: list[int]) -> tuple[int, int]:
        return self.prompt_builder.count_tokens(messages, image_tiles)

    def make_request(self, inp: GenerateInput) -> Request:
        """Build and validate a request (tokenization included); raises ``InvalidArgument``."""
        if not inp.request_id:
            raise InvalidArgument("request_id must be set")
        if len(inp.images) > self.config.scheduler.max_images_per_request:
            raise InvalidArgument(
                f"{len(inp.images)} images exceed the limit of {self.config.scheduler.max_images_per_request}"
            )
        hidden = self.spec.hidden_size
        tiles_per_row = self.prompt_builder.tokens_per_tile
        for k, img in enumerate(inp.images):
            shape = tuple(getattr(img.embeddings, "shape", ()))
            if (
                not isinstance(img.tiles, int)
                or img.tiles < 1
                or shape != (img.tiles * tiles_per_row, hidden)
            ):
                raise InvalidArgument(
                    f"images[{k}]: embeddings of shape {shape} do not match {img.tiles} tiles "
                    f"x {tiles_per_row} rows x hidden size {hidden}"
                )
        params = inp.sampling.validate(self.vocab_size)
        prompt = self.prompt_builder.build(
            inp.messages, [i.tiles for i in inp.images], [i.content_hash for i in inp.images]
        )
        n = len(prompt.token_ids)
        if n >= self.max_model_len:
            raise InvalidArgument(
                f"the prompt has {n} tokens ({prompt.num_image_tokens} of them image tokens); the context "
                f"holds {self.max_model_len} including at least one generated token",
                reason="context_length_exceeded",
            )
        room = self.max_model_len - n
        max_tokens = room if inp.max_tokens is None else inp.max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be a positive integer, got {inp.max_tokens!r}")
        if max_tokens > room:
            raise InvalidArgument(
                f"max_tokens={max_tokens} plus the {n}-token prompt exceed the context of {self.max_model_len}",
                reason="context_length_exceeded",
            )
        deadline = inp.deadline
        if deadline is not None and inp.deadline_is_epoch:
            deadline = self.clock() + (deadline - time.time())
        return Request(
            inp.request_id,
            prompt.token_ids,
            params,
            max_tokens,
            eos_token_ids=self.eos_token_ids,
            images=prompt.images,
            mm_embeddings=prompt.embeddings_for([i.embeddings for i in inp.images]),  # one per span
            cache_namespace=inp.cache_namespace,
            priority=inp.priority,
            arrival_time=self.clock(),
            deadline=deadline,
            tenant=inp.tenant,
            weight=inp.weight,
            max_kv_share=inp.max_kv_share,
            grammar=self.grammars.grammar_for(params.response_format),  # compiling on its pool
            prefix_group=inp.prefix_group,
        )
