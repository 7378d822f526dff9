"""Fixtures of the decoder suite: one tiny checkpoint per session, the transformers reference
(``helpers.Reference``) and a shared engine."""

from __future__ import annotations

import pytest
import torch

from services.decoder.engine.llm_engine import LLMEngine
from tests.decoder.helpers import Reference, make_config


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("decoder-tiny"), preset="tiny", llm="qwen2")


@pytest.fixture(scope="session")
def hf_model(tiny_ckpt):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def reference(hf_model, tokenizer):
    return Reference(hf_model, tokenizer)


@pytest.fixture(scope="session")
def engine(tiny_ckpt):
    """A shared default engine; tests using it must leave it idle."""
    eng = LLMEngine(make_config(tiny_ckpt))
    yield eng
    eng.shutdown()
