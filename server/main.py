"""Wiring: the aio gRPC server with the gateway service, health, reflection,
interceptors, and graceful shutdown.

    config = ServerConfig(model=None, port=50051)
    asyncio.run(serve(config))                    # blocks until SIGINT/SIGTERM

    with ServerThread(engine) as srv:             # in-process, for tests and benches
        Client(srv.target).generate_text("Hi")
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rome_engine.edit_store import EditStore
from rome_engine.editing import EditManager, rome_compute
from rome_engine.engine import Engine, EngineLimits
from rome_engine.loading import LoadedModel, load_model
from romegw_client import SERVICE_NAME
from romegw_client._pb import gateway_pb2 as pb
from romegw_client._pb import gateway_pb2_grpc as pb_grpc

from .interceptors import ErrorInterceptor
from .servicer import RomeGatewayServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # None: the embedded model
    host: str = "127.0.0.1"
    port: int = 50051
    device: str | None = None
    dtype: str | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_message_bytes: int = 16 * 1024 * 1024
    grace_seconds: float = 10.0
    edit_store: Path | None = None  # None: a temporary folder, edits do not survive a restart
    cache_dir: Path | None = None  # None: $ROMEGW_CACHE_DIR or ~/.cache/rome-gateway
    corpus: Path | None = None  # text for the covariance statistics; None: text sampled from the model


def build_engine(loaded: LoadedModel, config: ServerConfig) -> Engine:
    """The engine with its edit manager; the stored edit stack is re-applied here."""
    store_dir = config.edit_store
    if store_dir is None:
        store_dir = Path(tempfile.mkdtemp(prefix="romegw-edits-"))
        log.warning("no --edit-store given: edits go to %s and will not survive a restart", store_dir)
    store = EditStore(store_dir, loaded.model_id)
    manager = EditManager(loaded, store, rome_compute(config.cache_dir, config.corpus))
    manager.restore()
    return Engine(loaded, config.limits, manager)


def build_server(engine: Engine, config: ServerConfig) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A configured but not yet started server, and its health servicer (NOT_SERVING)."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    pb_grpc.add_RomeGatewayServicer_to_server(RomeGatewayServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["RomeGateway"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


async def start(engine: Engine, config: ServerConfig) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server, health_servicer = build_server(engine, config)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    await set_serving(health_servicer, True)
    return server, health_servicer, port


async def shutdown(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, grace: float) -> None:
    """Health goes NOT_SERVING, then in-flight calls get ``grace`` seconds to finish."""
    await set_serving(health_servicer, False)
    await server.stop(grace)


async def serve(config: ServerConfig) -> None:
    """Load the model, serve until SIGINT/SIGTERM, shut down gracefully."""
    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    log.info(
        "model %s (%s, %d layers): %.1fM parameters, device=%s, dtype=%s, loaded in %.1f s",
        loaded.model_id,
        loaded.spec.family,
        loaded.num_layers,
        loaded.num_parameters / 1e6,
        loaded.device,
        loaded.dtype_name,
        loaded.load_seconds,
    )
    engine = build_engine(loaded, config)
    server, health_servicer, port = await start(engine, config)
    log.info("listening on %s:%d (gRPC service %s; health and reflection enabled)", config.host, port, SERVICE_NAME)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, %.0f s grace for in-flight calls", config.grace_seconds)
    await shutdown(server, health_servicer, config.grace_seconds)
    engine.close()
    log.info("stopped")


class ServerThread:
    """An in-process server on its own event loop thread (tests, benchmarks)."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig(host="127.0.0.1", port=0)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="romegw-server", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(self.engine, self.config), self._loop)
        self._server, self._health, self.port = future.result(timeout=30)
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(shutdown(self._server, self._health, grace), self._loop).result(
                timeout=grace + 30
            )
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

