"""Fixtures shared by the whole suite: one tiny checkpoint per session, the family checkpoints (built
on first use), Redis on a test db, a redis-server of a test's own, the in-process encoder and decoder
cores, and one Ray Serve."""

from __future__ import annotations

import os

import pytest

from tests.support.own_redis import OwnRedis
from tests.support.shared_redis import redis_url as shared_redis_url
from tests.support.signing import ENV as MESH_SECRET_ENV

# Every Serve replica verifies request contexts with the mesh secret it inherits from the process that
# starts Ray; subprocesses (``serve``, the CLI) inherit it from here too.
os.environ.update(MESH_SECRET_ENV)


def _triton_interpreter_without_cuda() -> None:
    """Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors; it reads
    ``TRITON_INTERPRET`` once, when Triton is first imported, so it is set here, before any test."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_cuda()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def redis_url():
    import redis

    url = shared_redis_url()
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {url}: .ci/run starts it; start it for local runs")
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def own_redis():
    """A redis-server of this test's own (its own port, no persistence), for outages: the test kills,
    pauses or restarts it by its PID."""
    server = OwnRedis().start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def cores(tiny_checkpoint):
    """Real encoder (in-process preprocess, LRU only) and decoder cores of the tiny checkpoint, shared
    by the gateways of one module."""
    from tests.support.gateway import local_cores

    with local_cores(tiny_checkpoint) as built:
        yield built


@pytest.fixture(scope="session")
def ray_serve():
    """One Ray instance and one Serve for the whole session (start-up costs ~10 s here).

    Yields a dict with the Serve HTTP and gRPC proxy ports. Applications are deployed per module and
    deleted by the module that deployed them.
    """
    import tempfile

    from tests.support.ports import free_port

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


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """``family_checkpoint(name)``: the original-layout checkpoint of the row ``name`` of
    ``tests/support/families.py``, built on first use and shared by the session."""
    from tests.support.families import FAMILIES
    from tests.support.family_checkpoints import build_family_checkpoint

    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str):
        if name not in built:
            seed = list(FAMILIES).index(name)
            built[name] = build_family_checkpoint(FAMILIES[name], root / name, seed=seed)
        return built[name]

    return get
