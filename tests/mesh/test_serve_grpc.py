"""The README's serve command as a user runs it: a subprocess, real gRPC, SIGTERM to stop."""

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from internvl.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.grpc_server import channel_options
from services.common.pb import context_to_pb
from tests.support.images import png
from tests.support.ports import free_port
from tests.support.signing import signed


def _png() -> bytes:
    return png(900, 450, colour=(10, 200, 30))


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "serve-grpc",
            "--model",
            str(tiny_checkpoint),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 90
    while True:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                break
        except grpc.RpcError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve-grpc did not become ready:\n{proc.stdout.read()}")
        time.sleep(0.3)
    yield proc, channel
    channel.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_serves_preprocess_and_encoder(served):
    _, channel = served
    tiles = preprocess_pb2_grpc.PreprocessServiceStub(channel).TileImages(
        preprocess_pb2.TileImagesRequest(
            context=context_to_pb(signed()), images=[preprocess_pb2.ImageInput(data=_png())]
        ),
        timeout=30,
    )
    assert (tiles.images[0].grid_cols, tiles.images[0].grid_rows) == (2, 1)
    emb = encoder_pb2_grpc.EncoderServiceStub(channel).EmbedImages(
        encoder_pb2.EmbedImagesRequest(
            context=context_to_pb(signed()), images=[encoder_pb2.ImageSource(data=_png())]
        ),
        timeout=60,
    )
    assert emb.embeddings[0].tiles == 3


def test_bad_input_is_invalid_argument_and_the_server_lives_on(served):
    _, channel = served
    with pytest.raises(grpc.RpcError) as err:
        encoder_pb2_grpc.EncoderServiceStub(channel).EmbedImages(
            encoder_pb2.EmbedImagesRequest(
                context=context_to_pb(signed()), images=[encoder_pb2.ImageSource(data=b"\x89PNG broken")]
            ),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_shuts_down_cleanly(served):
    proc, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    out = proc.stdout.read()
    assert "shutting down" in out
