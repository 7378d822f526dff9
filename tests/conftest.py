"""Fixtures shared by the whole suite: one tiny checkpoint per session, Redis on a test db."""

from __future__ import annotations

import os

import pytest

REDIS_URL = os.environ.get("INTERNVL_MESH_TEST_REDIS", "redis://127.0.0.1:6379/9")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: .ci/run starts it; start it for local runs")
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def ray_serve():
    """One Ray instance and one Serve for the whole session (start-up costs ~10 s here).

    Yields a dict with the Serve HTTP and gRPC proxy ports. Applications are deployed per module and
    deleted by the module that deployed them.
    """
    import tempfile

    from tests.support.own_redis import free_port

    for key, value in {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
        "RAY_SERVE_LOG_TO_STDERR": "0",
    }.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    temp_dir = tempfile.mkdtemp(prefix="ivm-ray-", dir="/tmp")
    ray.init(
        num_cpus=8,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="warning",
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        grpc_options=gRPCOptions(
            port=grpc_port,
            grpc_servicer_functions=[
                "internvl.preprocess.v1.preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server",
                "internvl.encoder.v1.encoder_pb2_grpc.add_EncoderServiceServicer_to_server",
                "internvl.decoder.v1.decoder_pb2_grpc.add_DecoderServiceServicer_to_server",
            ],
        ),
    )
    yield {"http_port": http_port, "grpc_port": grpc_port}
    serve.shutdown()
    ray.shutdown()
