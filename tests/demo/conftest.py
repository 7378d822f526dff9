"""The shipped demo model, its held-out set and its answers through transformers' own ``generate``,
computed once per session and shared by the accuracy, mutation and end-to-end tests."""

from __future__ import annotations

import math

import pytest

# Held-out samples per (image kind, question type): 7 groups, 210 questions.
PER_GROUP = 30


@pytest.fixture(scope="session")
def demo_path():
    from services.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def demo(demo_path):
    from services.demo.evaluate import DemoModel

    return DemoModel.load(demo_path)


@pytest.fixture(scope="session")
def heldout_set():
    from services.demo.inputs import reference_pixels
    from services.demo.task import heldout

    samples = heldout(PER_GROUP)
    return samples, [reference_pixels(s.image) for s in samples]


@pytest.fixture(scope="session")
def generate_answers(demo, heldout_set):
    from services.demo.evaluate import answers

    samples, pixels = heldout_set
    return answers(demo, samples, pixels=pixels)


@pytest.fixture(scope="session")
def demo_untrained():
    """The demo architecture with its initial weights, and its codec."""
    from services.demo.inputs import PromptCodec
    from services.demo.train import build_model

    model, tokenizer = build_model(0)
    return model.eval(), PromptCodec(tokenizer, model.config.image_seq_length)


@pytest.fixture(scope="session")
def demo_pool(demo_untrained):
    """A small stage-1 pool: images through the (untrained) tower."""
    from services.demo.pool import build_pool
    from services.demo.train import DEMO_TOKENS_PER_TILE

    model, _ = demo_untrained
    return build_pool(model.model.vision_tower, 0, 60, math.isqrt(DEMO_TOKENS_PER_TILE), log=lambda _: None)
