"""The committed gRPC/protobuf stubs match protos/epwatch.proto."""

from __future__ import annotations

import pytest

from epwatch.protos import epwatch_pb2 as pb


@pytest.mark.timeout(60)
def test_generated_stubs_are_current() -> None:
    pytest.importorskip("grpc_tools", reason="pip install grpcio-tools (the test extra)")
    from epwatch.protos.generate import stale_outputs

    assert stale_outputs() == [], "run: make protos"


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["Collector"]
    assert service.full_name == "epwatch.v1.Collector"
    stream, push = service.methods_by_name["Stream"], service.methods_by_name["Push"]
    assert stream.client_streaming and stream.server_streaming
    assert not push.client_streaming and not push.server_streaming
    assert stream.input_type.name == push.input_type.name == "AgentMessage"
    assert stream.output_type.name == push.output_type.name == "Ack"
