"""The security review's attacks, re-run against real ``epwatch collector`` and
``epwatch agent`` processes on 127.0.0.1 (tests/attacks.py has them; loops are
bounded). For every input sequence here: the collector stays under 300 MB RSS and the
agent under 150 MB (peak, VmHWM); every refused input gets its documented gRPC status
and counted reason; nothing accepted is lost across a SIGKILL of the agent (with
--spool-dir) or of the collector; mTLS, token, peer-credential and identity checks
refuse and accept what they must. Limits and statuses: docs/security.md."""

from __future__ import annotations

import base64
import os
import resource
import signal
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import grpc
import numpy as np
import pytest

from epwatch.cliargs import free_port
from epwatch.frames import hook_frame
from epwatch.protos import epwatch_pb2 as pb
from tests import attacks
from tests.certs import TestPKI
from tests.helpers import Proc, make_records, samples, scrape, value, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

COLLECTOR_MB = 300
AGENT_MB = 150
NO_SAMPLERS = [f"--no-sampler.{n}" for n in ("nvidia", "amd", "netdev", "infiniband")]
NOBODY = 65534


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="epw") as d:  # short: socket paths
        os.chmod(d, 0o755)
        yield Path(d)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL, timeout=5)


def peak_mb(p: Proc) -> float:
    return attacks.rss_mb(p.popen.pid)[1]


def start_collector(
    workdir: Path, procs: list[Proc], name: str, *extra: str, grpc_port: int | None = None
) -> tuple[Proc, int, int]:
    g, h = grpc_port or free_port(), free_port()
    p = Proc(
        workdir,
        name,
        "collector",
        f"--grpc-listen=127.0.0.1:{g}",
        f"--metrics-listen=127.0.0.1:{h}",
        "--update-interval=0.5",
        "--log-level=WARNING",
        *extra,
    )
    procs.append(p)
    wait_for(lambda: bool(scrape(h)), timeout=30, what=f"{name} up", detail=p.output)
    return p, g, h


def start_agent(
    workdir: Path,
    procs: list[Proc],
    name: str,
    grpc_port: int,
    sock: Path,
    *extra: str,
    scrape_ready: bool = True,
) -> tuple[Proc, int]:
    h = free_port()
    p = Proc(
        workdir,
        name,
        "agent",
        f"--collector=127.0.0.1:{grpc_port}",
        "--node=node-0",
        f"--socket={sock}",
        f"--metrics-listen=127.0.0.1:{h}",
        "--flush-interval=0.05",
        "--backoff-max=0.3",
        "--log-level=WARNING",
        *NO_SAMPLERS,
        *extra,
    )
    procs.append(p)
    if scrape_ready:
        wait_for(lambda: bool(scrape(h)), timeout=30, what=f"{name} up", detail=p.output)
    return p, h


def rejected(port: int) -> dict[str, float]:
    found = samples(scrape(port), "epwatch_ingest_rejected_total")
    return {dict(k)["reason"]: v for k, v in found.items()}


def metric(port: int, name: str, **labels: str) -> float:
    return value(scrape(port), name, **labels) or 0.0


def test_collector_stays_bounded_and_counts_every_refusal(workdir, procs) -> None:
    col, g, h = start_collector(
        workdir,
        procs,
        "collector",
        "--new-group-grace=2",
        "--streams-per-peer=8",
        "--stream-idle-timeout=2",
    )
    client = attacks.Client(f"127.0.0.1:{g}")
    try:
        # Tiny messages naming a huge group; then valid, page-sparse 2 MB messages.
        assert {o.status for o in attacks.huge_world(client)} == {"INVALID_ARGUMENT"}
        assert {o.status for o in attacks.sparse_scatter(client, 4096)} == {"OK"}
        # Megabyte names, forged counters, wrapped durations, unsequenced batches.
        assert {o.status for o in attacks.long_names(client, 50)} == {"INVALID_ARGUMENT"}
        assert attacks.forged_counters(client).status == "INVALID_ARGUMENT"
        assert attacks.wrapped_duration(client).status == "INVALID_ARGUMENT"
        assert {o.status for o in attacks.unsequenced_batch_twice(client)} == {"INVALID_ARGUMENT"}
        # 64 junk groups fill every slot; a real group gets one once the junk has
        # completed no step for the grace (2 s here).
        attacks.junk_groups(client, 64)
        real = attacks.batch_message("real", 16, make_records(16, 16), seq=1, agent_id="real")
        assert client.push(real).detail.startswith("too_many_groups")
        time.sleep(2.5)
        assert (
            client.push(
                attacks.batch_message("real", 16, make_records(16, 16), seq=2, agent_id="real")
            ).status
            == "OK"
        )
        # 10,001 agent ids on one stream: the real agent's counter is kept.
        keep = pb.AgentMessage(
            agent_id="keeper", node="keep-node", stats=pb.AgentStats(records_dropped=7)
        )
        assert client.push(keep.SerializeToString()).status == "OK"
        churn = [
            pb.AgentMessage(
                agent_id=f"churn-{i}", node=f"c{i % 16}", stats=pb.AgentStats()
            ).SerializeToString()
            for i in range(10_001)
        ]
        assert client.stream(churn, timeout=120)[0] == "OK"
        assert metric(h, "epwatch_agent_records_dropped_total", node="keep-node") == 7
        # 256 idle streams: the peer gets 8, the rest RESOURCE_EXHAUSTED; an agent
        # still gets in, and the idle ones are closed after 2 s.
        release = attacks.idle_streams(client, 256)
        try:
            legit = attacks.Client(f"127.0.0.1:{g}")
            out = legit.push(
                attacks.batch_message("real", 16, make_records(16, 16), seq=3, agent_id="real"),
                timeout=10,
            )
            assert out.status == "OK"
        finally:
            release()
        counts = rejected(h)
        assert counts["bad_world_size"] == 2 and counts["bad_name"] == 50
        assert counts["bad_stats"] == 1 and counts["negative_time"] == 1
        assert counts["missing_seq"] == 2 and counts["too_many_groups"] >= 1
        assert counts["too_many_streams"] == 256 - 8
        body = scrape(h)
        assert len(body) < 2_000_000  # no megabyte names or 10k series in /metrics
        print(f"collector peak RSS {peak_mb(col):.0f} MB")
        assert peak_mb(col) < COLLECTOR_MB, f"collector peaked at {peak_mb(col):.0f} MB"
        assert col.popen.poll() is None
    except AssertionError:
        print(col.output())
        raise


def web_config(workdir: Path, pki: TestPKI) -> tuple[Path, tuple[str, str]]:
    server = pki.server()
    hashed = bcrypt.hashpw(b"scrape-pass", bcrypt.gensalt(4)).decode()
    path = workdir / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {server.cert}\n  key_file: {server.key}\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    return path, ("prometheus", "scrape-pass")


def https_scrape(port: int, pki: TestPKI, auth: tuple[str, str] | None) -> int:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    req = urllib.request.Request(f"https://localhost:{port}/metrics")
    if auth:
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mtls_token_and_identity_between_real_processes(workdir, procs) -> None:
    pki = TestPKI(workdir / "pki")
    server = pki.server()
    token = workdir / "token"
    token.write_text("chaos-token-0123456789\n")
    token.chmod(0o600)
    web, creds = web_config(workdir, pki)
    # Started by hand: with --web-config its /metrics answers HTTPS with a login only.
    g, h = free_port(), free_port()
    col = Proc(
        workdir,
        "collector",
        "collector",
        f"--grpc-listen=127.0.0.1:{g}",
        f"--metrics-listen=127.0.0.1:{h}",
        "--log-level=WARNING",
        f"--tls-cert={server.cert}",
        f"--tls-key={server.key}",
        f"--tls-client-ca={pki.ca}",
        f"--token-file={token}",
        f"--web-config={web}",
    )
    procs.append(col)
    wait_for(lambda: https_scrape(h, pki, creds) == 200, timeout=30, detail=col.output)
    assert https_scrape(h, pki, None) == 401 and https_scrape(h, pki, ("prometheus", "x")) == 401
    node0 = pki.client("node-0")
    sock = workdir / "a.sock"
    agent, ah = start_agent(
        workdir,
        procs,
        "agent",
        g,
        sock,
        f"--tls-ca={pki.ca}",
        f"--tls-cert={node0.cert}",
        f"--tls-key={node0.key}",
        "--tls-server-name=localhost",
        f"--token-file={token}",
    )
    try:
        with attacks.connect(str(sock)) as s:
            s.sendall(hook_frame("ep0", 16, make_records(160, 16)))
        wait_for(
            lambda: metric(ah, "epwatch_agent_records_delivered_total") == 160, detail=agent.output
        )

        def client(node: str | None, with_token: bool = True) -> attacks.Client:
            pair = pki.client(node) if node else None
            creds = grpc.ssl_channel_credentials(
                pki.ca.read_bytes(),
                pair.key.read_bytes() if pair else None,
                pair.cert.read_bytes() if pair else None,
            )
            tok = "chaos-token-0123456789" if with_token else None
            return attacks.Client(f"127.0.0.1:{g}", creds, tok, "localhost")

        forged = attacks.forged_node(client("evil"), node="node-0")
        assert forged.status == "PERMISSION_DENIED"
        assert (
            client("node-0", with_token=False)
            .push(attacks.batch_message("ep0", 16, make_records(16, 16), seq=1, node="node-0"))
            .status
            == "UNAUTHENTICATED"
        )
        assert client(None).push(b"", timeout=5).status == "UNAVAILABLE"  # no client cert
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        req = urllib.request.Request(f"https://localhost:{h}/metrics")
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(b"prometheus:scrape-pass").decode()
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            body = r.read().decode()
        assert value(body, "epwatch_ingest_records_total", ep_group="ep0") == 160
        assert value(body, "epwatch_ingest_rejected_total", reason="identity") == 1
        assert value(body, "epwatch_ingest_rejected_total", reason="unauthenticated") == 1
        assert peak_mb(agent) < AGENT_MB and peak_mb(col) < COLLECTOR_MB
    except AssertionError:
        print(col.output(), agent.output())
        raise


def test_agent_socket_attacks_leave_it_bounded_and_serving(workdir, procs) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    col, g, h = start_collector(workdir, procs, "collector", "--max-message-bytes=1048576")
    sock = workdir / "a.sock"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    # The agent at a 1024-descriptor limit (hard too: raising it cannot help here), and
    # with room for more clients than descriptors so that accept() meets EMFILE.
    agent = Proc(
        workdir,
        "agent",
        "agent",
        f"--collector=127.0.0.1:{g}",
        "--node=node-0",
        f"--socket={sock}",
        f"--metrics-listen=127.0.0.1:{(ah := free_port())}",
        "--flush-interval=0.05",
        "--backoff-max=0.3",
        "--log-level=WARNING",
        "--spool-bytes=32MiB",
        "--max-clients=2000",
        *NO_SAMPLERS,
        preexec=limit,
    )
    procs.append(agent)
    wait_for(lambda: bool(scrape(ah)), timeout=30, detail=agent.output)
    sent = 0

    def ship(n: int) -> None:
        nonlocal sent
        with attacks.connect(str(sock)) as s:
            s.sendall(hook_frame("ep0", 16, make_records(n, 16, step0=sent // 16)))
        sent += n

    try:
        # Descriptor exhaustion: the accept loop backs off and keeps going.
        held = attacks.exhaust_descriptors(str(sock), 1070)
        time.sleep(1.0)
        for s in held:
            s.close()
        ship(32)
        wait_for(
            lambda: metric(ah, "epwatch_agent_records_delivered_total") == sent,
            timeout=30,
            detail=agent.output,
        )
        reasons = samples(scrape(ah), "epwatch_agent_frames_rejected_total")
        assert any(dict(k)["reason"] == "accept_failed" and v > 0 for k, v in reasons.items())
        # Announced 64 MiB frames allocate nothing; the frame cap closes them.
        held = attacks.announce_huge_frames(str(sock), 6)
        time.sleep(0.5)
        assert peak_mb(agent) < AGENT_MB
        for s in held:
            s.close()
        # Another user: the 0660 socket keeps it out.
        frame = hook_frame("ep0", 16, make_records(16, 16))
        if os.geteuid() == 0:
            assert attacks.send_as_user(str(sock), NOBODY, NOBODY, frame) == "refused"
        # 300 peer-row-only frames of 1 MiB: the spool holds 32 MiB of them at most,
        # and the collector's 1 MiB limit makes the agent split each 8 MiB batch.
        attacks.peer_row_frames(str(sock), 300)
        ship(32)
        wait_for(
            lambda: metric(ah, "epwatch_agent_records_delivered_total") == sent,
            timeout=60,
            detail=agent.output,
        )
        body = scrape(ah)
        assert value(body, "epwatch_agent_spool_bytes") <= 32 << 20
        assert value(body, "epwatch_agent_messages_split_total") > 0
        assert value(body, "epwatch_agent_reconnects_total") == 0  # nothing resent forever
        print(f"agent peak RSS {peak_mb(agent):.0f} MB, collector {peak_mb(col):.0f} MB")
        assert peak_mb(agent) < AGENT_MB, f"agent peaked at {peak_mb(agent):.0f} MB"
        assert peak_mb(col) < COLLECTOR_MB
        assert metric(h, "epwatch_ingest_records_total", ep_group="ep0") == sent
    except AssertionError:
        print(agent.output())
        raise


def test_nothing_accepted_is_lost_across_sigkills(workdir, procs) -> None:
    sock, spool = workdir / "a.sock", workdir / "spool"
    col, g, h = start_collector(workdir, procs, "collector-1")
    agent, ah = start_agent(workdir, procs, "agent-1", g, sock, f"--spool-dir={spool}")
    sent = [0]

    def ship(n: int) -> None:
        with attacks.connect(str(sock)) as s:
            s.sendall(hook_frame("ep0", 16, make_records(n, 16, step0=sent[0] // 16)))
        sent[0] += n

    ship(320)
    wait_for(lambda: metric(ah, "epwatch_agent_records_delivered_total") == 320)
    counted_by_first = metric(h, "epwatch_ingest_records_total", ep_group="ep0")
    col.stop(signal.SIGKILL)
    ship(480)  # accepted and spooled (on disk) while the collector is down
    wait_for(lambda: metric(ah, "epwatch_agent_spool_records") == 480)
    wait_for(lambda: metric(ah, "epwatch_agent_records_at_risk") == 0)  # on disk, not batching
    agent.stop(signal.SIGKILL)
    col2, _, h2 = start_collector(workdir, procs, "collector-2", grpc_port=g)
    agent2, ah2 = start_agent(workdir, procs, "agent-2", g, sock, f"--spool-dir={spool}")
    try:
        wait_for(
            lambda: metric(h2, "epwatch_ingest_records_total", ep_group="ep0") == 480,
            timeout=30,
            detail=agent2.output,
        )
        assert counted_by_first + 480 == sent[0] == 800  # counts add up exactly
        assert metric(ah2, "epwatch_agent_records_lost_total") == 0
        time.sleep(1.0)  # nothing more arrives (no duplicate counting)
        assert metric(h2, "epwatch_ingest_records_total", ep_group="ep0") == 480
        # Without --spool-dir a SIGKILL loses the spool; the next agent counts it.
        agent2.stop(signal.SIGTERM)
        sock2 = workdir / "b.sock"
        col2.stop(signal.SIGKILL)
        agent3, ah3 = start_agent(workdir, procs, "agent-3", g, sock2)
        with attacks.connect(str(sock2)) as s:
            s.sendall(hook_frame("ep0", 16, make_records(64, 16)))
        wait_for(lambda: metric(ah3, "epwatch_agent_records_at_risk") == 64)
        time.sleep(1.5)  # the state file catches up (about once a second)
        agent3.stop(signal.SIGKILL)
        agent4, ah4 = start_agent(workdir, procs, "agent-4", g, sock2)
        assert metric(ah4, "epwatch_agent_records_lost_total") == 64
        assert "did not stop cleanly" in agent4.output()
    except AssertionError:
        for p in procs:
            print(f"--- {p.name}\n{p.output()}")
        raise
    assert np.isfinite(counted_by_first)
