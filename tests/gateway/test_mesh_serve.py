"""The whole mesh on Ray Serve, deployed from the same rendered Serve config that `serve`, `serve
deploy` and KubeRay use: the official openai client over Serve's HTTP proxy, and the public gRPC API
(health and reflection without Ray metadata) on the gateway's own port. Answers equal the reference."""

import base64

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.gateway.otlp_collector import start_collector
from tests.support.gateway import reference_answer
from tests.support.images import png
from tests.support.mesh import deployed, one_model_mesh_config
from tests.support.ports import free_port

pytestmark = pytest.mark.ray

MODEL = "tiny-mesh"


@pytest.fixture(scope="module")
def mesh(ray_serve, tiny_checkpoint):
    grpc_port, otlp_port, metrics_port = free_port(), free_port(), free_port()
    collector, collector_server = start_collector(otlp_port)
    cfg = one_model_mesh_config(
        ray_serve["http_port"],
        tiny_checkpoint,
        MODEL,
        gateway={"grpc_port": grpc_port, "metrics_port": metrics_port},
        tracing={"otlp_endpoint": f"127.0.0.1:{otlp_port}", "export_delay_ms": 100},
    )
    with deployed(cfg):
        yield {
            "http": f"http://127.0.0.1:{ray_serve['http_port']}/v1",
            "grpc": f"127.0.0.1:{grpc_port}",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "collector": collector,
            "checkpoint": tiny_checkpoint,
        }
    collector_server.stop(0)


def _uri(data):
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_openai_client_through_serve_matches_the_reference(mesh, tiny_checkpoint):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    img = png(1000, 500, seed=11)
    client = openai.OpenAI(base_url=mesh["http"], api_key="unused", max_retries=0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _uri(img)}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    want = reference_answer(
        model,
        tokenizer,
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        [img],
        12,
        10,
    )
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert first.choices[0].message.content == want
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == want  # the repeated image is a cache hit and changes nothing
    assert [m.id for m in client.models.list().data] == [MODEL]


def _reference(mesh, images, question, max_new_tokens):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    if "reference" not in mesh:
        path = mesh["checkpoint"]
        mesh["reference"] = (
            InternVLForConditionalGeneration.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
    model, tokenizer = mesh["reference"]
    parts = [*({"type": "image"} for _ in images), {"type": "text", "text": question}]
    return reference_answer(
        model, tokenizer, [{"role": "user", "content": parts}], images, 12, max_new_tokens
    )


def test_public_grpc_with_health_and_reflection(mesh):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(mesh["grpc"]) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        names = [
            s.name
            for r in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            for s in r.list_services_response.service
        ]
        assert "internvl.gateway.v1.GatewayService" in names
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.ChatRequest(
            model=MODEL,
            messages=[
                gateway_pb2.ChatMessage(
                    role="user",
                    content=[
                        gateway_pb2.Part(image=gateway_pb2.Image(data=png(500, 500, seed=3))),
                        gateway_pb2.Part(text="Describe it."),
                    ],
                )
            ],
            max_tokens=6,
        )
        chunks = list(stub.Chat(request, timeout=120))
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
        assert "".join(c.text for c in chunks) == _reference(
            mesh, [png(500, 500, seed=3)], "Describe it.", 6
        ), "the gRPC API answers like the reference"
        assert [m.id for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models] == [MODEL]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Chat(gateway_pb2.ChatRequest(model="unknown", messages=request.messages), timeout=30))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_one_trace_spans_gateway_encoder_preprocess_and_decoder(mesh):
    """One trace of the mesh's own (the caller's traceparent is a link of its root, never its parent)
    across every service, with no text of the request in any span."""
    import time

    import httpx

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = {
        "model": MODEL,
        "max_tokens": 3,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _uri(png(640, 400, seed=23))}},
                    {"type": "text", "text": "Trace me."},
                ],
            }
        ],
    }
    r = httpx.post(
        mesh["http"] + "/chat/completions",
        json=body,
        timeout=120,
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert r.status_code == 200
    wanted = {
        "gateway.chat",
        "gateway.embed",
        "encoder.embed",
        "encoder.cache_lookup",
        "preprocess.tile",
        "gateway.generate",
        "decoder.generate",
        "decoder.prefill",
        "decoder.decode",
    }
    deadline = time.monotonic() + 30
    while True:
        snapshot = mesh["collector"].snapshot()
        roots = [s for s in snapshot if s["name"] == "gateway.chat" and trace_id in s["links"]]
        ours = roots[0]["trace_id"] if roots else None
        spans = [s for s in snapshot if s["trace_id"] == ours]
        if wanted <= {s["name"] for s in spans} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ours != trace_id and not [s for s in snapshot if s["trace_id"] == trace_id]
    assert not [s["name"] for s in spans if "Trace me" in s["text"]]
    assert wanted <= {s["name"] for s in spans}, sorted({s["name"] for s in spans})
    services = {s["service"] for s in spans}
    assert {
        "internvl-mesh-gateway",
        "internvl-mesh-encoder",
        "internvl-mesh-preprocess",
        "internvl-mesh-decoder",
    } <= services
    by_id = {s["span_id"]: s for s in spans}
    parent_of = {s["name"]: by_id.get(s["parent"], {}).get("name") for s in spans}
    assert parent_of["encoder.embed"] == "gateway.embed"
    assert parent_of["decoder.generate"] == "gateway.generate"
    assert parent_of["preprocess.tile"] in {"encoder.embed", "encoder.cache_lookup", "encoder.encode"}


def test_metrics_with_documented_names(mesh, ray_serve):
    import time

    import httpx
    import ray

    from gateway.metrics import METRIC_NAMES

    body = {
        "model": MODEL,
        "max_tokens": 3,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _uri(png(500, 300, seed=5))}},
                    {"type": "text", "text": "Count."},
                ],
            }
        ],
    }
    assert httpx.post(mesh["http"] + "/chat/completions", json=body, timeout=120).status_code == 200
    text = httpx.get(mesh["metrics"], timeout=30).text
    for name in METRIC_NAMES:
        assert name in text, name
    assert f'internvl_mesh_requests_total{{model="{MODEL}",status="ok",tenant="default"}}' in text

    # The decoder's gauges live in its replica and leave through Ray's metrics agent.
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60
    while True:
        exported = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "ray_internvl_mesh_kv_cache_usage_perc" in exported or time.monotonic() > deadline:
            break
        time.sleep(1)
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
    ):
        assert f"ray_internvl_mesh_{name}" in exported
