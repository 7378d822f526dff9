"""Requests that share a prefix (the same image first, the same tenant namespace) reach the decoder
replica that holds it: with two decoder replicas, every repeat of an image is a KV prefix hit. Under
Serve's default router (the power of two choices by load) each repeat would miss half the time: six
images repeated once all hit by chance with probability 1/64."""

import pytest

from tests.multinode.test_1_placement import chat
from tests.support.images import png

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]


def test_repeats_of_an_image_hit_the_prefix_cache_of_its_replica(mesh):
    images = [png(320 + 32 * i, 240, seed=100 + i) for i in range(6)]
    for image in images:
        first = chat(mesh, image, "Describe it.")
        assert first.status_code == 200, first.text
    cached = []
    for i, image in enumerate(images):
        again = chat(mesh, image, f"Question {i}?")
        assert again.status_code == 200, again.text
        usage = again.json()["usage"]
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    image_tokens = usage["prompt_tokens_details"]["image_tokens"]
    assert all(c >= image_tokens for c in cached), cached
