"""The decoder's routing key is the prefix cache's identity (namespace, text before the first image,
the first image's key), never the rest of the prompt; the hash ring sends a key to one replica and
moves only the keys of a replica that leaves."""

from services.common.context import RequestContext
from services.common.refs import EmbeddingRef
from services.decoder.routing import HashRing, key_of_args, routing_key
from services.decoder.types import ChatMessage, DecodeRequest, ImagePlaceholder, TextContent


def ref(key: str) -> EmbeddingRef:
    return EmbeddingRef("cache", key, "sha-" + key, 1, 16, 8, "float32")


def request(*messages: tuple[str, list]) -> DecodeRequest:
    return DecodeRequest([ChatMessage(role, content) for role, content in messages])


def image_then(question: str, system: str = "Be brief.") -> DecodeRequest:
    return request(("system", [TextContent(system)]), ("user", [ImagePlaceholder(), TextContent(question)]))


A, B = RequestContext(cache_namespace="a"), RequestContext(cache_namespace="b")


def test_same_image_and_system_prompt_share_a_key_whatever_the_question():
    assert routing_key(image_then("What?"), [ref("k1")], A) == routing_key(image_then("Why?"), [ref("k1")], A)


def test_namespace_image_and_prefix_each_change_the_key():
    base = routing_key(image_then("What?"), [ref("k1")], A)
    assert routing_key(image_then("What?"), [ref("k1")], B) != base
    assert routing_key(image_then("What?"), [ref("k2")], A) != base
    assert routing_key(image_then("What?", system="Be long."), [ref("k1")], A) != base


def test_text_only_keyed_by_the_conversation_before_the_question():
    history = [
        ("system", [TextContent("S")]),
        ("user", [TextContent("q1")]),
        ("assistant", [TextContent("a1")]),
    ]
    one = routing_key(request(*history, ("user", [TextContent("q2")])), [], A)
    two = routing_key(request(*history, ("user", [TextContent("other")])), [], A)
    assert one == two is not None
    assert routing_key(request(("user", [TextContent("hello")])), [], A) is None  # nothing to share


def test_key_only_for_generate_arguments():
    assert key_of_args((image_then("x"), [ref("k1")], A)) is not None
    assert key_of_args(([], [], A)) is None
    assert key_of_args(("a", "b")) is None


def test_ring_is_stable_and_moves_only_a_leaving_replicas_keys():
    ring = HashRing(["r1", "r2", "r3"])
    keys = [f"key{i}" for i in range(300)]
    owner = {k: ring.order(k)[0] for k in keys}
    assert set(owner.values()) == {"r1", "r2", "r3"}
    assert all(sorted(ring.order(k)) == ["r1", "r2", "r3"] for k in keys[:10])
    smaller = HashRing(["r1", "r3"])
    for k in keys:
        if owner[k] != "r2":
            assert smaller.order(k)[0] == owner[k]
