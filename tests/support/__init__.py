"""Helpers shared by the test suites (fixtures live in the ``conftest.py`` files, which import from
here; tests never import from a ``conftest``):

- ``images``: the synthetic images (noise, solid, photo-like PNG/JPEG; hand-written PNG headers).
- ``ports``: a free port on 127.0.0.1.
- ``shared_redis``: the Redis URL (``INTERNVL_MESH_TEST_REDIS``) with one db per suite, and a client
  that deletes a suite's keys at the end.
- ``own_redis``: a redis-server owned by one test, for outages.
- ``gateway``: the gateway in process (real cores, uvicorn on loopback) and the reference answer.
- ``gateway_servers``: HTTP and gRPC front ends of one in-process gateway on one event loop.
- ``mesh``: the whole mesh deployed into the session's Ray Serve for a module.
- ``serve_process``: ``internvl-mesh serve`` as a subprocess, as a user runs it.

Helpers that one suite alone uses live in that suite's ``helpers.py``.
"""
