"""Request intake without the model: what the parent of an engine process needs to build requests.

``DecoderCore`` with ``engine_process`` builds and validates every request in its own process
(prompt building, tokenization, the checks against the context, the images and the sampling values)
and sends the engine process a finished ``Request``. ``RequestIntake`` holds what that takes — the
checkpoint's config, its tokenizer and prompt builder, the model's plan (``plan_model``: no weight
is read) — and runs ``LLMEngine``'s own ``make_request`` and ``count_tokens`` on it, so a request is
validated by the same code whichever mode serves it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

from services.common.checkpoint import Checkpoint
from services.decoder.config import DecoderConfig
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.model_runner import plan_model
from services.decoder.engine.structured import GrammarCompiler
from services.decoder.prompting import load_prompt_builder


class RequestIntake:
    def __init__(self, config: DecoderConfig, clock: Callable[[], float] = time.monotonic):
        checkpoint = Checkpoint.open(config.model)
        plan = plan_model(config, checkpoint.text_config)
        self.max_model_len = plan.max_model_len
        # The context length as the engine decides it (``LLMEngine.__init__``): the plan's.
        self.config = config.model_copy(
            update={"scheduler": config.scheduler.model_copy(update={"max_model_len": self.max_model_len})}
        )
        self.clock = clock
        self.prompt_builder = load_prompt_builder(checkpoint)
        self.tokenizer = self.prompt_builder.tokenizer
        self.vocab_size = int(checkpoint.text_config["vocab_size"])
        self.eos_token_ids = self._eos_ids(checkpoint)
        # ``make_request`` reads the model's hidden size where the engine keeps it: its runner's spec.
        self.executor = SimpleNamespace(runner=SimpleNamespace(spec=plan.spec))
        # A response format is compiled here too, off the event loop: a schema that does not compile is
        # refused before the request leaves this process (the engine process compiles its own copy).
        self.grammars = GrammarCompiler.from_config(
            self.tokenizer, self.vocab_size, self.eos_token_ids, config.structured
        )

    def shutdown(self) -> None:
        self.grammars.close()

    # LLMEngine's admission half, one piece of code for both modes.
    _eos_ids = LLMEngine._eos_ids
    count_tokens = LLMEngine.count_tokens
    make_request = LLMEngine.make_request
