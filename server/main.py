"""Wiring: the aio gRPC server with the gateway service, health, reflection,
interceptors (auth, errors, metrics), TLS, the metrics HTTP endpoint, and
graceful shutdown.

Shutdown on SIGTERM/SIGINT, in this order (the Kubernetes pattern):

1. health answers NOT_SERVING at once; the port stays open;
2. pre-stop: for ``prestop_seconds`` every call, running or new, is still served,
   while load balancers notice and take the instance out (a second signal ends
   this period early);
3. ``server.stop(grace)``: no new calls; running calls get ``grace_seconds``, then
   are cancelled;
4. ``engine.close()``: no new engine work, and a running edit computation or
   trace is told to stop (an edit that has not begun storing is never stored);
5. exit. Total: about prestop + grace seconds.

    config = ServerConfig(model=None, port=50051)
    asyncio.run(serve(config))                    # blocks until SIGINT/SIGTERM

    with ServerThread(engine) as srv:             # in-process, for tests and benches
        Client(srv.target).generate_text("Hi")
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from rome_engine.edit_store import EditStore, HistoryStore
from rome_engine.editing import EditManager, method_compute
from rome_engine.engine import Engine, EngineLimits
from rome_engine.loading import LoadedModel, load_model
from rome_engine.pg_store import PostgresEditStore, is_database_url
from rome_engine.protocol import EngineClient
from romegw_client import SERVICE_NAME
from romegw_client.pb import gateway_pb2 as pb
from romegw_client.pb import gateway_pb2_grpc as pb_grpc

from .auth import TokenTable
from .interceptors import AuthInterceptor, ErrorInterceptor
from .metrics import Metrics
from .servicer import DEFAULT_PAGE_BYTES, RomeGatewayServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    cert: Path  # server certificate chain (PEM)
    key: Path  # its private key (PEM)
    client_ca: Path | None = None  # set: clients must present a certificate signed by this CA (mutual TLS)

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # None: the embedded model
    host: str = "127.0.0.1"
    port: int = 50051
    device: str | None = None
    dtype: str | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int = 256  # calls in progress at once (all RPCs); more are RESOURCE_EXHAUSTED by gRPC
    grace_seconds: float = 10.0
    prestop_seconds: float = 0.0  # after SIGTERM: health NOT_SERVING while still serving, before the grace period
    max_page_bytes: int = DEFAULT_PAGE_BYTES  # byte budget of a ListEdits page (also <= max_message_bytes / 4)
    # a folder, or a PostgreSQL URL (postgresql://...?schema=NAME) whose history replicas share;
    # None: a temporary folder, edits do not survive a restart
    edit_store: Path | str | None = None
    cache_dir: Path | None = None  # None: $ROMEGW_CACHE_DIR or ~/.cache/rome-gateway
    corpus: Path | None = None  # text for the covariance statistics; None: text sampled from the model
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    metrics_host: str | None = None  # None: the gRPC host
    tokens: TokenTable = field(default_factory=lambda: TokenTable([]))
    tls: TlsConfig | None = None
    insecure_allow_remote: bool = False  # serve a non-loopback address without tokens


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServerConfig) -> None:
    """With no tokens configured, refuse to listen beyond loopback unless told to."""
    if not config.tokens.enabled and not is_loopback(config.host) and not config.insecure_allow_remote:
        raise ValueError(
            f"refusing to serve {config.host} without authentication: configure tokens (--tokens-file or "
            "ROMEGW_TOKENS), bind a loopback address, or pass --insecure-allow-remote"
        )


def warn_plaintext_tokens(config: ServerConfig) -> None:
    """Tokens sent in plaintext beyond loopback can be read off the network: say so, loudly.

    Not refused: TLS is often terminated in front of the gateway (a service mesh sidecar, an
    ingress) so that the gateway itself listens in plaintext on the pod network.
    """
    if config.tokens.enabled and config.tls is None and not is_loopback(config.host):
        log.warning(
            "SECURITY: bearer tokens are accepted in PLAINTEXT on %s (not a loopback address): anyone on the "
            "network path can read and replay them. Serve TLS (--tls-cert/--tls-key) or make sure TLS is "
            "terminated in front of this port (a mesh sidecar, an ingress) and the port is not reachable otherwise",
            config.host,
        )


def build_engine(loaded: LoadedModel, config: ServerConfig) -> Engine:
    """The engine with its edit manager; the stored edit stack is re-applied here."""
    store_dir = config.edit_store
    if store_dir is None:
        store_dir = Path(tempfile.mkdtemp(prefix="romegw-edits-"))
        log.warning("no --edit-store given: edits go to %s and will not survive a restart", store_dir)
    store: HistoryStore
    if isinstance(store_dir, str) and is_database_url(store_dir):
        store = PostgresEditStore(store_dir, loaded.model_id)  # schema steps run here; Unavailable if down
    else:
        store = EditStore(store_dir, loaded.model_id)
    manager = EditManager(
        loaded, store, method_compute(config.cache_dir, config.corpus),
        max_update_norm_ratio=config.limits.max_update_norm_ratio,
    )
    manager.restore()
    return Engine(loaded, config.limits, manager)


def build_server(
    engine: EngineClient, config: ServerConfig, metrics: Metrics | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A configured but not yet started server, and its health servicer."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.tokens.enabled:
        interceptors.append(AuthInterceptor(config.tokens, metrics))
    interceptors.append(ErrorInterceptor(metrics))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    page_bytes = min(config.max_page_bytes, config.max_message_bytes // 4)
    pb_grpc.add_RomeGatewayServicer_to_server(RomeGatewayServicer(engine, metrics, page_bytes=page_bytes), server)
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


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics: Metrics | None
    metrics_port: int | None
    metrics_httpd: object | None
    follower: asyncio.Future | None = None  # engine.follow(): a shared history's other writers


def make_metrics(engine: EngineClient) -> Metrics:
    m = engine.info()
    metrics = Metrics(model_id=m.model_id, dtype=m.dtype, device=m.device, load_seconds=m.load_seconds)
    metrics.bind(engine)
    return metrics


async def start(engine: EngineClient, config: ServerConfig) -> Running:
    check_exposure(config)
    warn_plaintext_tokens(config)
    metrics = make_metrics(engine)
    server, health_servicer = build_server(engine, config, metrics)
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        port = server.add_secure_port(address, config.tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    httpd, metrics_port = None, None
    if config.metrics_port is not None:
        httpd, _ = start_http_server(
            config.metrics_port, addr=config.metrics_host or config.host, registry=metrics.registry
        )
        metrics_port = httpd.server_port
    await server.start()
    await set_serving(health_servicer, True)
    follower = asyncio.ensure_future(engine.follow())
    return Running(server, health_servicer, port, metrics, metrics_port, httpd, follower)


async def prestop(running: Running, seconds: float, hurry: asyncio.Event) -> None:
    """Health NOT_SERVING while every call is still served, for ``seconds`` or until ``hurry`` is set."""
    await set_serving(running.health, False)
    if seconds <= 0:
        return
    log.info("pre-stop: health NOT_SERVING, still serving for %.1f s (signal again to skip)", seconds)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), seconds)


async def shutdown(running: Running, grace: float) -> None:
    """Health goes NOT_SERVING, then in-flight calls get ``grace`` seconds to finish."""
    await set_serving(running.health, False)
    if running.follower is not None:
        running.follower.cancel()
    await running.server.stop(grace)
    if running.metrics_httpd is not None:
        running.metrics_httpd.shutdown()
        running.metrics_httpd.server_close()


async def serve(config: ServerConfig) -> None:
    """Load the model, serve until SIGINT/SIGTERM, shut down gracefully."""
    check_exposure(config)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)
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
    running = await start(engine, config)
    log.info(
        "listening on %s:%d (%s; gRPC service %s, health and reflection; auth %s)",
        config.host,
        running.port,
        "TLS" + (" with client certificates" if config.tls and config.tls.client_ca else "")
        if config.tls
        else "plaintext",
        SERVICE_NAME,
        f"on, {len(config.tokens)} tokens" if config.tokens.enabled else "off",
    )
    if running.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host or config.host, running.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    stop.clear()  # a second signal ends the pre-stop period early
    await prestop(running, config.prestop_seconds, stop)
    log.info("shutting down: health NOT_SERVING, %.0f s grace for in-flight calls", config.grace_seconds)
    await shutdown(running, config.grace_seconds)
    engine.close()  # after the grace deadline: a running edit or trace stops at its next step
    log.info("stopped")


class ServerThread:
    """An in-process server on its own event loop thread (tests, benchmarks)."""

    def __init__(self, engine: EngineClient, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig(host="127.0.0.1", port=0)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="romegw-server", daemon=True)
        self.running: Running | None = None

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        assert self.running is not None and self.running.metrics_port is not None
        return f"http://{self.config.host}:{self.running.metrics_port}/metrics"

    def start(self) -> ServerThread:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(self.engine, self.config), self._loop)
        self.running = future.result(timeout=30)
        self.port = self.running.port
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(shutdown(self.running, grace), self._loop).result(timeout=grace + 30)
            self.running = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
