"""The gRPC face of the collector: ``epwatch.v1.Collector`` plus health and reflection.

The two methods are registered with raw-bytes (identity) deserializers: gRPC would
answer a message it cannot parse with INTERNAL and, on a stream, end the stream. Here
the bytes are parsed by the ingest path, so garbage is an INVALID_ARGUMENT like every
other malformed message, and on ``Stream`` it is one rejecting ``Ack`` while the
stream carries on. gRPC's own transport limit is set above ours so an oversized
message reaches us and gets the same treatment.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epwatch.collector.agents import AgentTable
from epwatch.collector.ingest import Ingestor
from epwatch.protos import epwatch_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Collector"].full_name  # "epwatch.v1.Collector"


class CollectorHandlers:
    """``Stream`` and ``Push`` over raw bytes."""

    def __init__(self, ingestor: Ingestor, agents: AgentTable) -> None:
        self._ingestor = ingestor
        self._agents = agents

    def stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        agent_id = ""
        try:
            for raw in requests:
                out = self._ingestor.handle(raw)
                if out.agent_id and not agent_id:
                    agent_id = out.agent_id
                    self._agents.stream_opened(agent_id, out.node)
                if out.seq or out.code:
                    yield out.ack().SerializeToString()
        finally:
            if agent_id:
                self._agents.stream_closed(agent_id)

    def push(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        out = self._ingestor.handle(raw)
        if out.code:
            status = _STATUS.get(out.code, grpc.StatusCode.UNKNOWN)
            context.abort(status, f"{out.reason}: {out.message}")
        return out.ack().SerializeToString()


_STATUS = {s.value[0]: s for s in grpc.StatusCode}


def build_server(
    handlers: CollectorHandlers,
    listen: str,
    *,
    max_message_bytes: int,
    max_workers: int = 256,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not started) server bound to ``listen``; returns the bound port."""
    transport_limit = 2 * max_message_bytes + (1 << 20)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", 4 << 20),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
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
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {listen}")
    return server, port, health_servicer
