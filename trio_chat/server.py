"""The server: the root nursery and everything's lifetime under it.

Owns start-up and shutdown. :meth:`Server.run` opens the root nursery and
starts, in order, the store's writer task, the hub (whose nursery holds the
rooms), the WebSockets' writers (flusher, heartbeat, and a writer for each
full socket), and the listeners, whose handler tasks (one per TCP connection)
run in a connections nursery. So cancelling ``run`` tears down every task the
server ever started; a graceful :meth:`Server.shutdown` instead stops
accepting (after ``server.drainDelay`` seconds of answering ``/readyz`` with
503), closes every WebSocket with 1001, gives connections a grace deadline,
flushes the store and returns.

:meth:`Server.build` makes the parts and the :class:`~.http.Services` record
that every HTTP connection is given; the HTTP side never sees the server.
"""

from __future__ import annotations

import logging
import socket

import attrs
import trio

from .auth import IdentityRates, IpLimiter
from .bridge import open_bridge
from .broker import BrokerUnavailable, LocalBroker, RedisBroker
from .budget import ByteBudget
from .config import Config, data_url_frame_bytes
from .deflate import Deflaters
from .framing import GOING_AWAY, LargeFrames
from .http import NodeInfo, Readiness, Services, Shutdown, load_demo_page, serve_http
from .http.budget import UploadAllowance
from .hub import Hub
from .lag import watch_loop_lag
from .media import configure_decoding, expire_unsent_uploads
from .metrics import Metrics, count_tasks
from .store import Repository, Store, make_backend
from .workers import SharedMetrics
from .writers import Limits, Writers

log = logging.getLogger(__name__)

# How often an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM) is reported while it lasts.
ACCEPT_ERROR_LOG_INTERVAL = 10.0


class _AcceptErrorThrottle(logging.Filter):
    """Passes one of trio.serve_listeners' accept-error records per interval, without
    its traceback, noting how many were held back.

    trio retries a failed accept every 0.1 s; out of descriptors, each retry would
    otherwise log a traceback, ten a second, for as long as the shortage lasts.
    """

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._next = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.created < self._next:
            self._held += 1
            return False
        self._next = record.created + self._interval
        record.exc_info = record.exc_text = None
        if self._held:
            record.msg = f"{record.msg} (%d more since the last report)"
            record.args = (*(record.args or ()), self._held)
            self._held = 0
        return True


logging.getLogger("trio.serve_listeners").addFilter(
    _AcceptErrorThrottle(ACCEPT_ERROR_LOG_INTERVAL))


async def open_shared_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on ``host:port`` with SO_REUSEPORT: the kernel spreads connections
    across every process listening on the same port."""
    listeners: list[trio.SocketListener] = []
    for family, kind, proto, _, address in await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            for listener in listeners:
                await listener.aclose()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners


def _peer(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "?"
    return f"{host}:{port}"


@attrs.define(eq=False)
class Server:
    config: Config
    metrics: Metrics
    store: Store
    broker: LocalBroker | RedisBroker
    hub: Hub
    writers: Writers
    # What the HTTP side is given: the handlers never see the server.
    services: Services
    port: int = 0
    # Bind with SO_REUSEPORT, so several worker processes share one port.
    reuse_port: bool = False
    # The task running run(): every task the server starts is below it.
    task: trio.lowlevel.Task | None = None
    # Under --workers: publishes this worker's metrics for the others (trio_chat.workers).
    shared_metrics: SharedMetrics | None = None

    @classmethod
    def build(cls, config: Config, worker: str | None = None) -> Server:
        """The server and its parts; ``worker`` names it ("2/4") under ``--workers``."""
        s = config.server
        metrics = Metrics()
        configure_decoding(config.media)
        stored = s.ack_after == "stored"
        backend = make_backend(config)
        repository = Repository(backend)
        store = Store(backend, metrics, buffer_limit=s.store_buffer,
                      buffer_bytes=s.store_buffer_bytes,
                      batch_size=s.store_batch, wait=s.store_wait,
                      refuse_when_failing=s.store_outage == "refuse")
        broker: LocalBroker | RedisBroker
        if config.redis is not None:
            broker = RedisBroker(config.redis, store, recent_size=max(100, s.history_on_join),
                                 idempotency_window=s.idempotency_window, log=stored,
                                 orphaned_after=s.orphaned_after, metrics=metrics,
                                 recent_ttl=s.recent_ttl)
            if stored:
                store.after_write = broker.written
        else:
            broker = LocalBroker(store, s.idempotency_window,
                                 sent_bytes_limit=s.idempotency_memory_bytes)
        # A chat_img frame may carry its image as a data URL: base64 plus the frame around
        # it, within the server-wide large-frame budget. Every other message is refused at
        # its header over maxFrameBytes.
        image_frame = data_url_frame_bytes(config.media)
        limits = Limits(max_message_bytes=s.max_frame_bytes,
                        large_message_bytes=max(s.max_frame_bytes, image_frame),
                        queue_frames=s.send_queue_messages, queue_bytes=s.send_queue_bytes,
                        write_wait=s.write_wait, ping_period=s.ping_period,
                        pong_wait=s.pong_wait, close_timeout=s.close_timeout)
        writers = Writers(limits, LargeFrames(s.large_frame_budget),
                          ByteBudget(config.limits.outbound_bytes_per_ip,
                                     config.limits.outbound_bytes_total),
                          ByteBudget(config.limits.inbound_bytes_per_ip,
                                     config.limits.inbound_bytes_total),
                          Deflaters(metrics))
        limits_config = config.limits
        hub = Hub(store, repository, broker, metrics, s.history_on_join, s.replay_limit,
                  s.presence_ttl, s.room_policy, config.media, ack_after_stored=stored,
                  history_bytes=s.history_bytes,
                  # A page of the longest messages is a quarter of a connection's queue.
                  replay_page=max(1, s.send_queue_bytes // (4 * s.max_frame_bytes)),
                  identity_rates=IdentityRates(limits_config.identity_messages_per_second,
                                               limits_config.identity_message_burst),
                  schedule_flush=writers.flush_room_soon)
        readiness = Readiness()
        services = Services(config, metrics, hub, repository, store, broker, writers,
                            IpLimiter(config.limits.connections_per_ip), Shutdown(),
                            load_demo_page(),
                            node=NodeInfo(broker.node if isinstance(broker, RedisBroker)
                                          else "local", worker), readiness=readiness,
                            http_limiter=IpLimiter(config.limits.http_connections_per_ip),
                            bodies=ByteBudget(config.limits.body_bytes_per_ip,
                                              config.limits.body_bytes_total),
                            uploads=UploadAllowance(config.limits.uploads_per_minute,
                                                    config.limits.upload_bytes_per_hour))
        readiness.add_check(lambda: None if store.failing_since is None else (
            "store_failing", f"history store writes failing for {store.outage_seconds:.1f} s"))
        server = cls(config, metrics, store, broker, hub, writers, services)
        metrics.add_gauge("large_frame_bytes", "Bytes of chat_img messages over "
                          "maxFrameBytes being read or handled (server.largeFrameBudget).",
                          lambda: writers.large.used)
        metrics.add_gauge("outbound_queued_bytes", "Bytes queued for WebSocket clients, "
                          "history, pongs and held-back frames included.",
                          lambda: sum(c.queued_bytes for c in hub.connections))
        metrics.add_gauge("inbound_bytes", "Bytes WebSocket readers hold: partial frames, "
                          "fragments, messages being handled, data URLs three times "
                          "(limits.inboundBytesPerIp, inboundBytesTotal).",
                          lambda: writers.inbound.held())
        metrics.add_gauge("store_buffer_bytes", "Bytes of accepted messages not yet "
                          "written (server.storeBufferBytes).", lambda: store.lag_bytes)
        metrics.add_gauge("connections_open", "Open WebSocket connections.",
                          lambda: len(hub.connections))
        metrics.add_gauge("deflate_connections", "Open WebSocket connections that "
                          "negotiated permessage-deflate.",
                          lambda: writers.deflaters.connections)
        metrics.add_gauge("rooms_live", "Rooms with members on this node.",
                          lambda: len(hub.rooms))
        metrics.add_gauge("presence_entries",
                          "Authors online in a room through a connection to this node.",
                          lambda: hub.presence.entries)
        metrics.add_gauge("http_body_bytes", "Bytes of request bodies held (read, not yet "
                          "answered).", lambda: services.bodies.held())
        metrics.add_gauge("trio_tasks", "Live trio tasks in this process.", count_tasks)
        metrics.add_gauge("store_lag_messages", "Accepted messages not yet written.",
                          lambda: store.lag)
        metrics.add_gauge("store_failing", "1 while store writes are failing.",
                          lambda: int(store.failing_since is not None))
        if isinstance(broker, RedisBroker):
            readiness.add_check(lambda: None if broker.connected else (
                "broker_unavailable", "Redis is unreachable"))
            metrics.add_gauge("redis_connected", "1 while the Redis broker is connected.",
                              lambda: int(broker.connected))
            metrics.add_gauge("redis_outage_seconds", "How long Redis has been unreachable.",
                              lambda: 0.0 if broker.down_since is None
                              else trio.current_time() - broker.down_since)
        metrics.add_gauge("store_outage_seconds", "How long store writes have been failing.",
                          lambda: store.outage_seconds)
        return server

    @property
    def shutting_down(self) -> bool:
        return self.services.shutdown.draining

    def shutdown(self) -> None:
        """Ask :meth:`run` to stop gracefully (after the drain delay); returns at once."""
        self.services.shutdown.drain()

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled (abrupt) or until :meth:`shutdown` (graceful)."""
        self.task = trio.lowlevel.current_task()
        # The asyncio loop (for MySQL and Redis) outlives every task that uses it.
        needed = self.config.db is not None or self.config.redis is not None
        async with open_bridge(needed=needed):
            try:
                async with trio.open_nursery() as root:
                    await self._serve(root, task_status)
            finally:
                if isinstance(self.broker, RedisBroker):
                    # A task cancelled mid-call may have opened a connection after the
                    # broker closed its own: close that too while the loop still runs.
                    await self.broker.close_late()

    async def _serve(self, root: trio.Nursery,
                     task_status: trio.TaskStatus[Server]) -> None:
        """Start everything in ``root``, serve until :meth:`shutdown`, then wind down."""
        s = self.config.server
        await root.start(watch_loop_lag, self.metrics)
        if self.shared_metrics is not None:
            await root.start(self.shared_metrics.run)
        await root.start(self.store.run)
        if isinstance(self.broker, RedisBroker):
            await root.start(self.broker.run)
            if self.broker.log:
                await root.start(self.broker.sweep_logs)
        else:
            await root.start(self.broker.run)
        await root.start(self.hub.run)
        await root.start(self.writers.run)
        await root.start(expire_unsent_uploads, self.services.repository, self.config.media)
        listeners = (await open_shared_listeners(s.host, s.port) if self.reuse_port
                     else await trio.open_tcp_listeners(s.port, host=s.host))
        self.port = listeners[0].socket.getsockname()[1]
        urls = []
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            urls.append(f"http://{f'[{host}]' if ':' in host else host}:{port}/")
        log.info("listening on %s; history: %s; broker: %s", ", ".join(urls),
                 self._describe_store(), self._describe_broker(),
                 extra={"event": "listening", "urls": urls})
        async with trio.open_nursery() as connections:
            accept_scope = trio.CancelScope()
            await connections.start(self._accept, accept_scope, listeners, connections)
            self.services.readiness.listening = True
            task_status.started(self)
            await self.services.shutdown.wait_draining()
            if s.drain_delay and not self.services.shutdown.begun:
                log.info("draining: /readyz answers 503; closing in %g s", s.drain_delay)
                await trio.sleep(s.drain_delay)
            self.services.shutdown.begin()
            started = trio.current_time()
            accept_scope.cancel()
            self.services.readiness.listening = False
            log.info("shutting down: closing %d connections", len(self.hub.connections))
            self.hub.close_all(GOING_AWAY, "server shutting down")
            self.services.shutdown.end_idle()
            # Grace for the close handshakes; half the budget, the rest is the flush's.
            connections.cancel_scope.deadline = started + s.shutdown_timeout / 2
        with trio.move_on_at(started + s.shutdown_timeout) as flush_scope:
            try:
                # Withdraw at once; otherwise other nodes see us online until it expires.
                await self.hub.presence.flush()
            except BrokerUnavailable:
                log.warning("could not withdraw presence; it expires in %gs",
                            s.presence_ttl)
            except Exception:
                # Still flush the store below.
                self.metrics.unexpected("presence_failures", log, "could not withdraw "
                                        "presence; it expires in %gs", s.presence_ttl)
            await self.store.flush()
        if flush_scope.cancelled_caught:
            log.error("shutdown deadline passed with %d messages not stored",
                      self.store.lag)
        else:
            log.info("store flushed; stopped")
        root.cancel_scope.cancel()

    def _describe_store(self) -> str:
        db = self.config.db
        if db is not None:
            return f"MySQL {db.host}:{db.port}/{db.database}"
        return f"SQLite {self.config.sqlite.path}"

    def _describe_broker(self) -> str:
        r = self.config.redis
        if r is None:
            return "in-process (one node)"
        return f"Redis {r.host}:{r.port} database {r.database}, channels {r.publish_channel_name}"

    async def _accept(self, scope: trio.CancelScope, listeners: list[trio.SocketListener],
                      connections: trio.Nursery, *,
                      task_status: trio.TaskStatus[list[trio.SocketListener]]
                      = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            # Out of descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM), trio's
            # serve_listeners logs, sleeps 0.1 s and accepts again: never fatal.
            await trio.serve_listeners(self._handle, listeners, handler_nursery=connections,
                                       task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        remote = _peer(stream)
        try:
            await serve_http(self.services, stream, remote)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: connection lost: %s", remote, exc)
        except Exception:
            # One connection's failure is its own: log it once, never reach the root.
            self.metrics.unexpected("connection_failures", log, "%s: connection failed",
                                    remote)
