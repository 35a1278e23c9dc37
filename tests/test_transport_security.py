"""mTLS, bearer tokens and identities on the gRPC port, and --web-config on the HTTP
side, with real certificates (tests/certs.py) and real gRPC/TLS on 127.0.0.1."""

from __future__ import annotations

import base64
import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter

from epwatch.agent.daemon import Agent, AgentConfig
from epwatch.agent.shipper import ClientSecurity
from epwatch.collector.server import ServerSecurity
from epwatch.credentials import CredentialError, read_token
from epwatch.frames import FrameSender, hook_frame
from epwatch.webconfig import WebConfigError, load_web_config
from epwatch.webserver import WebServer
from tests import attacks
from tests.certs import TestPKI
from tests.helpers import make_records, start_collector, value, wait_for

pytestmark = pytest.mark.timeout(60)
TOKEN = b"s3cret-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TestPKI:
    pki = TestPKI(tmp_path_factory.mktemp("pki"))
    pki.server_pair = pki.server()
    return pki


def channel_creds(pki: TestPKI, node: str | None, san: bool = True) -> grpc.ChannelCredentials:
    pair = pki.client(node, san=san) if node else None
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )


def mtls_collector(pki: TestPKI, token: bytes | None = None, **kw):
    security = ServerSecurity(
        tls_cert=pki.server_pair.cert.read_bytes(),
        tls_key=pki.server_pair.key.read_bytes(),
        client_ca=pki.ca.read_bytes(),
        token=token,
    )
    return start_collector(security=security, **kw)


def rejected(svc, reason: str) -> float:
    return value(svc.metrics_text(), "epwatch_ingest_rejected_total", reason=reason) or 0.0


def batch(node: str, seq: int = 1) -> bytes:
    return attacks.batch_message(
        "ep0", 16, make_records(16, 16), seq=seq, agent_id=f"{node}:1", node=node
    )


def test_mtls_identity_must_match_the_node(pki: TestPKI) -> None:
    svc = mtls_collector(pki)
    try:
        target = f"127.0.0.1:{svc.grpc_port}"
        good = attacks.Client(target, channel_creds(pki, "node-0"), server_name="localhost")
        assert good.push(batch("node-0")).status == "OK"
        # The forgery: a certified agent claiming another node's timings.
        evil = attacks.Client(target, channel_creds(pki, "evil"), server_name="localhost")
        out = attacks.forged_node(evil, node="node-0")
        assert out.status == "PERMISSION_DENIED" and "identity" in out.detail
        status, acks = evil.stream([batch("node-0", seq=2)])
        assert status == "PERMISSION_DENIED" and not acks
        assert rejected(svc, "identity") == 2
        # A certificate with the name only in its CN is accepted for that name.
        cn_only = attacks.Client(
            target, channel_creds(pki, "node-cn", san=False), server_name="localhost"
        )
        assert cn_only.push(batch("node-cn")).status == "OK"
        # No client certificate, or plaintext: the TLS handshake itself fails.
        anonymous = attacks.Client(target, channel_creds(pki, None), server_name="localhost")
        assert anonymous.push(batch("node-0", seq=3), timeout=5).status == "UNAVAILABLE"
        assert attacks.Client(target).push(batch("node-0", 4), timeout=5).status == "UNAVAILABLE"
        assert value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group="ep0") == 32
    finally:
        svc.stop(grace_s=0.2)


def test_bearer_token_is_required(pki: TestPKI) -> None:
    svc = start_collector(security=ServerSecurity(token=TOKEN))
    try:
        target = f"127.0.0.1:{svc.grpc_port}"
        assert attacks.Client(target).push(batch("n0")).status == "UNAUTHENTICATED"
        wrong = attacks.Client(target, token="s3cret-token-0123456788")
        assert wrong.stream([batch("n0")])[0] == "UNAUTHENTICATED"
        assert rejected(svc, "unauthenticated") == 2
        assert attacks.Client(target, token=TOKEN.decode()).push(batch("n0")).status == "OK"
    finally:
        svc.stop(grace_s=0.2)


def test_agent_ships_over_mtls_with_a_token(pki: TestPKI, tmp_path: Path) -> None:
    svc = mtls_collector(pki, token=TOKEN)
    pair = pki.client("node-7")
    sock = str(tmp_path / "a.sock")
    security = ClientSecurity(
        ca=pki.ca.read_bytes(),
        cert=pair.cert.read_bytes(),
        key=pair.key.read_bytes(),
        token=TOKEN,
        server_name="localhost",
    )
    agent = Agent(
        AgentConfig(
            node="node-7",
            socket_path=sock,
            collector=f"127.0.0.1:{svc.grpc_port}",
            flush_interval_s=0.05,
            security=security,
        )
    )
    agent.start()
    try:
        with FrameSender(sock) as s:
            s.send(hook_frame("ep0", 16, make_records(64, 16)))
        wait_for(lambda: agent.spool.counters.records_delivered == 64)
        assert agent.shipper.auth_failures == 0
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


def test_agent_with_the_wrong_certificate_is_refused_and_says_why(pki, tmp_path, caplog) -> None:
    svc = mtls_collector(pki)
    pair = pki.client("other-node")
    sock = str(tmp_path / "a.sock")
    security = ClientSecurity(
        ca=pki.ca.read_bytes(),
        cert=pair.cert.read_bytes(),
        key=pair.key.read_bytes(),
        server_name="localhost",
    )
    agent = Agent(
        AgentConfig(
            node="node-7",
            socket_path=sock,
            collector=f"127.0.0.1:{svc.grpc_port}",
            backoff_max_s=0.2,
            security=security,
        )
    )
    with caplog.at_level(logging.ERROR):
        agent.start()
        try:
            wait_for(lambda: agent.shipper.auth_failures >= 1)
        finally:
            agent.stop(drain_timeout=0)
            svc.stop(grace_s=0.2)
    assert "must name this node" in caplog.text
    assert rejected(svc, "identity") >= 1


def test_token_file_checks(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(CredentialError, match="fewer than 16"):
        read_token(str(short))
    good = tmp_path / "token"
    good.write_text(TOKEN.decode() + "\n")
    good.chmod(0o600)
    assert read_token(str(good)) == TOKEN


# --- the HTTP side ------------------------------------------------------------------------
def write_web_config(tmp: Path, pki: TestPKI, client_ca: bool, users: bool) -> Path:
    lines = [
        "tls_server_config:",
        f"  cert_file: {pki.server_pair.cert}",
        f"  key_file: {pki.server_pair.key}",
    ]
    if client_ca:
        lines += ["  client_auth_type: RequireAndVerifyClientCert", f"  client_ca_file: {pki.ca}"]
    if users:
        hashed = bcrypt.hashpw(b"scrape-pass", bcrypt.gensalt(4)).decode()
        lines += ["basic_auth_users:", f"  prometheus: '{hashed}'"]
    path = tmp / "web.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def https_get(
    port: int,
    path: str,
    pki: TestPKI,
    client: str | None = None,
    auth: tuple[str, str] | None = None,
) -> int:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        pair = pki.client(client)
        ctx.load_cert_chain(pair.cert, pair.key)
    req = urllib.request.Request(f"https://localhost:{port}{path}")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_web_config_covers_metrics_and_every_route(pki: TestPKI, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Counter("epwatch_test_things", "Things", registry=registry).inc()
    security = load_web_config(write_web_config(tmp_path, pki, client_ca=True, users=True))
    srv = WebServer(
        registry, "127.0.0.1", 0, routes={"/api/v1/x": lambda q: (200, {})}, security=security
    ).start()
    try:
        creds = ("prometheus", "scrape-pass")
        for path in ("/metrics", "/api/v1/x", "/api/v1/later-route"):
            assert https_get(srv.port, path, pki, "prometheus", ("prometheus", "wrong")) == 401
            assert https_get(srv.port, path, pki, "prometheus") == 401
        assert https_get(srv.port, "/metrics", pki, "prometheus", creds) == 200
        assert https_get(srv.port, "/api/v1/x", pki, "prometheus", creds) == 200
        with pytest.raises(OSError):  # no client certificate: the handshake fails
            https_get(srv.port, "/metrics", pki, None, creds)
        with pytest.raises(OSError):  # plaintext HTTP on the TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5)
    finally:
        srv.stop()


def test_web_config_errors_are_clear(tmp_path: Path, pki: TestPKI) -> None:
    cases = {
        "tls_server_config:\n  cert_file: x.crt\n  key_file: x.key\n": "cannot load",
        "tls_server_config:\n  cipher_suites: [x]\n": "not supported",
        "basic_auth_users:\n  u: plaintext\n": "bcrypt hash",
        "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: X\n": "auth_type",
        "nonsense: 1\n": "not supported",
    }
    for text, message in cases.items():
        path = tmp_path / "w.yml"
        path.write_text(text)
        with pytest.raises(WebConfigError, match=message):
            load_web_config(path)


def test_exposed_plaintext_ports_warn_with_a_remedy(caplog) -> None:
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING):
        WebServer(registry, "127.0.0.1", 0).start().stop()
        assert "without TLS" not in caplog.text
        WebServer(registry, "0.0.0.0", 0).start().stop()
    assert "without TLS or authentication" in caplog.text and "--web-config" in caplog.text
