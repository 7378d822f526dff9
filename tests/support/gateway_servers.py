"""Both public front ends of one in-process gateway, served from one background event loop.

The encoder's batcher and the decoder's per-request queues belong to the loop that first uses them,
so HTTP (uvicorn) and gRPC (grpc.aio) must share a loop; uvicorn's own thread would give HTTP a loop
of its own. Only 127.0.0.1 is bound.
"""

from __future__ import annotations

import asyncio
import threading
import time

from tests.support.ports import free_port


class GatewayServers:
    """``with GatewayServers(gateway) as s``: ``s.http_url`` (``.../v1``) and ``s.grpc_target``.

    The loop is run by ``asyncio.run``, which cancels whatever tasks the cores left on it (the
    encoder's batcher) when the servers stop, so the cores can be closed afterwards from another loop.
    """

    def __init__(self, gateway, start_timeout_s: float = 30.0):
        self.gateway = gateway
        self.start_timeout_s = start_timeout_s
        self.http_port = free_port()
        self.grpc_port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="gateway-servers", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import uvicorn

        from gateway.grpc_api import GatewayServicer
        from gateway.http_api import create_http_app
        from services.common.grpc_server import start_server

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        grpc_server = await start_server([GatewayServicer(self.gateway).registration()])
        self.grpc_port = grpc_server.port
        server = uvicorn.Server(
            uvicorn.Config(
                create_http_app(self.gateway), host="127.0.0.1", port=self.http_port, log_level="warning"
            )
        )
        http_task = asyncio.create_task(server.serve())
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while not server.started:
                if http_task.done() or time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not start")
                await asyncio.sleep(0.05)
            self._ready.set()
            await self._stop.wait()
        finally:
            server.should_exit = True
            await asyncio.wait_for(http_task, 10)
            await grpc_server.stop(1)

    def __enter__(self) -> GatewayServers:
        self._thread.start()
        if not self._ready.wait(self.start_timeout_s + 5) or self._error is not None:
            raise RuntimeError(f"gateway servers did not start: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"
