"""The gRPC face of the collector: ``epwatch.v1.Collector`` plus health and reflection.

The two methods are registered with raw-bytes (identity) deserializers: gRPC would
answer a message it cannot parse with INTERNAL and, on a stream, end the stream. Here
the bytes are parsed by the ingest path, so garbage is an INVALID_ARGUMENT like every
other malformed message, and on ``Stream`` it is one rejecting ``Ack`` while the
stream carries on. gRPC's own transport limit is set above ours so an oversized
message reaches us and gets the same treatment.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epwatch.collector.agents import AgentTable
from epwatch.collector.ingest import Ingestor
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RecordError

log = logging.getLogger(__name__)

MAX_MESSAGE_METADATA = "epwatch-max-message-bytes"
SERVICE = pb.DESCRIPTOR.services_by_name["Collector"].full_name  # "epwatch.v1.Collector"


@dataclass(frozen=True)
class ServerSecurity:
    """What the gRPC port asks of a client: TLS (``tls_cert``/``tls_key``, PEM bytes),
    a client certificate signed by ``client_ca`` (mTLS: the certificate's DNS names,
    or its CN, are the only ``node`` names the client may send), a bearer token.
    Empty: plaintext and anyone may send, the default on 127.0.0.1."""

    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    client_ca: bytes | None = None
    token: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def peer_identities(context: grpc.ServicerContext) -> frozenset[str] | None:
    """The names of a client's verified certificate: its DNS SANs, else its CN."""
    auth = context.auth_context()
    names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name")
    if not names:
        return None
    return frozenset(n.decode(errors="replace") for n in names)


class StreamGate:
    """Open streams per peer (its certificate name, else its address) and their last
    message: a peer past ``per_peer`` streams is refused, and a stream silent for
    ``idle_s`` is cancelled (an agent heartbeats every few seconds), so idle or
    hoarded streams cannot take every worker from the legitimate agents."""

    def __init__(self, per_peer: int, idle_s: float) -> None:
        self.per_peer = per_peer
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._last: dict[grpc.ServicerContext, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reap, name="stream-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def enter(self, key: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_peer:
                raise RecordError(
                    "too_many_streams", f"{key} already has {n} open streams (the limit)"
                )
            self._open[key] = n + 1
            self._last[context] = time.monotonic()

    def touch(self, context: grpc.ServicerContext) -> None:
        self._last[context] = time.monotonic()

    def leave(self, key: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)
            self._last.pop(context, None)

    def _reap(self) -> None:
        while not self._stop.wait(max(0.05, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [c for c, t in self._last.items() if now - t > self.idle_s]
            for context in idle:
                log.info("closing a stream silent for %.0f s", self.idle_s)
                context.cancel()


class CollectorHandlers:
    """``Stream`` and ``Push`` over raw bytes, behind the port's checks."""

    def __init__(
        self,
        ingestor: Ingestor,
        agents: AgentTable,
        *,
        security: ServerSecurity | None = None,
        gate: StreamGate | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._ingestor = ingestor
        self._agents = agents
        self._security = security or ServerSecurity()
        self._gate = gate or StreamGate(per_peer=1 << 30, idle_s=float("inf"))
        self._on_refused = on_refused or (lambda reason: None)

    def _admit(self, context: grpc.ServicerContext) -> frozenset[str] | None:
        """The client's certificate names (None without mTLS); RecordError if its
        token is missing or wrong."""
        token = self._security.token
        if token is not None:
            sent = dict(context.invocation_metadata()).get("authorization", "")
            scheme, _, value = sent.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token):
                raise RecordError("unauthenticated", "missing or wrong bearer token")
        if self._security.client_ca is None:
            return None
        names = peer_identities(context)
        if not names:  # TLS verified a certificate, so this is not expected
            raise RecordError("identity", "the client certificate names nobody")
        return names

    def _refuse(self, context: grpc.ServicerContext, exc: RecordError) -> None:
        self._on_refused(exc.reason)
        context.abort(_REFUSAL_STATUS[exc.reason], f"{exc.reason}: {exc}")

    def stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            names = self._admit(context)
            key = min(names) if names else _peer_host(context.peer())
            self._gate.enter(key, context)
        except RecordError as exc:
            self._refuse(context, exc)
            return
        # The agent sizes (or splits) what it sends to this limit.
        context.send_initial_metadata(
            ((MAX_MESSAGE_METADATA, str(self._ingestor.max_message_bytes)),)
        )
        agent_id = ""
        try:
            for raw in requests:
                self._gate.touch(context)
                out = self._ingestor.handle(raw, names)
                if out.reason == "identity":
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity: {out.message}")
                if out.agent_id and not agent_id:
                    agent_id = out.agent_id
                    self._agents.stream_opened(agent_id, out.node)
                if out.seq or out.code:
                    yield out.ack().SerializeToString()
        finally:
            self._gate.leave(key, context)
            if agent_id:
                self._agents.stream_closed(agent_id)

    def push(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            names = self._admit(context)
        except RecordError as exc:
            self._refuse(context, exc)
            raise AssertionError("abort raises") from None
        out = self._ingestor.handle(raw, names)
        if out.code:
            status = _STATUS.get(out.code, grpc.StatusCode.UNKNOWN)
            context.abort(status, f"{out.reason}: {out.message}")
        return out.ack().SerializeToString()


_STATUS = {s.value[0]: s for s in grpc.StatusCode}
_REFUSAL_STATUS = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "identity": grpc.StatusCode.PERMISSION_DENIED,
    "too_many_streams": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' -> 'ipv4:127.0.0.1' (one key per client host)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def build_server(
    handlers: CollectorHandlers,
    listen: str,
    *,
    max_message_bytes: int,
    max_workers: int = 256,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not started) server bound to ``listen``; returns the bound port."""
    transport_limit = 2 * max_message_bytes + (1 << 20)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", 4 << 20),
            # Agents ping every 10 s while idle; a client pinging more often than every
            # 5 s is struck and, after two strikes, disconnected. The server pings too,
            # so a vanished peer's connection (and its streams) go within 40 s.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.max_connection_idle_ms", 300_000),
        ],
        maximum_concurrent_rpcs=max_workers,
    )
    methods = {
        "Stream": grpc.stream_stream_rpc_method_handler(handlers.stream),
        "Push": grpc.unary_unary_rpc_method_handler(handlers.push),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is not None:
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {listen}")
    return server, port, health_servicer
