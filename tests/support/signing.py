"""The mesh secret of the test suite: the conftest puts it into ``IVM_MESH_SECRET`` before Ray starts
(replicas inherit it), and in-process gateways and servicers sign and verify with ``SIGNER``."""

from __future__ import annotations

from dataclasses import replace

from services.common.context import MESH_SECRET_ENV, ContextSigner, RequestContext

SECRET = "internvl-mesh-test-suite-secret-0123456789abcdef"
SIGNER = ContextSigner(SECRET.encode())
ENV = {MESH_SECRET_ENV: SECRET}


def signed(ctx: RequestContext | None = None, **changes) -> RequestContext:
    """``ctx`` (or a default context) with ``changes``, signed by the suite's secret."""
    return SIGNER.sign(replace(ctx or RequestContext(), **changes))
