"""Re-run the security review's attacks against real epwatch processes on 127.0.0.1 and
print what each did: peak RSS (MB), gRPC statuses, counters. ``--before`` uses only the
flags an older epwatch has, so the same script measures a checkout before the fixes
(run it with that checkout first on PYTHONPATH).

    python bench/attacks.py [--before] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epwatch.cliargs import free_port
from epwatch.frames import hook_frame
from tests import attacks
from tests.helpers import make_records, value

NO_SAMPLERS = [f"--no-sampler.{n}" for n in ("nvidia", "amd", "netdev", "infiniband")]


def scrape(port: int, timeout: float = 60.0) -> tuple[str, float]:
    t = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        body = r.read().decode(errors="replace")
    return body, time.monotonic() - t


@contextlib.contextmanager
def process(
    *args: str, preexec: Callable[[], None] | None = None, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    p = subprocess.Popen(
        [sys.executable, "-m", "epwatch.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec,
    )
    try:
        if not attacks.wait_until(ready, 30):
            log.seek(0)
            raise RuntimeError(f"{args[0]} did not start:\n{log.read().decode()[-2000:]}")
        yield p
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        log.close()


def collector(grpc: int, http: int, *extra: str) -> contextlib.AbstractContextManager:
    args = [
        "collector",
        f"--grpc-listen=127.0.0.1:{grpc}",
        f"--metrics-listen=127.0.0.1:{http}",
        "--log-level=ERROR",
        *extra,
    ]
    return process(*args, ready=lambda: bool(scrape(http)[0]))


def agent(grpc: int, sock: str, http: int, *extra: str, **kw) -> contextlib.AbstractContextManager:
    args = [
        "agent",
        f"--collector=127.0.0.1:{grpc}",
        "--node=bench-node",
        f"--socket={sock}",
        f"--metrics-listen=127.0.0.1:{http}",
        "--log-level=ERROR",
        *NO_SAMPLERS,
        *extra,
    ]
    return process(*args, ready=lambda: bool(scrape(http)[0]), **kw)


def statuses(outcomes: list[attacks.Outcome]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in Counter(o.status for o in outcomes).items())


def mb(p: subprocess.Popen) -> str:
    cur, peak = attacks.rss_mb(p.pid)
    return f"RSS {cur:.0f} MB (peak {peak:.0f})"


def run_collector_attacks(before: bool, only: set[str]) -> None:
    def want(name: str) -> bool:
        return not only or name in only

    def fresh(*extra: str) -> tuple[contextlib.AbstractContextManager, int, int]:
        g, h = free_port(), free_port()
        return collector(g, h, *extra), g, h

    if want("huge_world"):
        ctx, g, h = fresh()
        with ctx as p:
            start = mb(p)
            c = attacks.Client(f"127.0.0.1:{g}")
            out = attacks.huge_world(c)
            time.sleep(2)
            print(f"huge_world: 2 Pushes world_size 65536: {statuses(out)}; {start} -> {mb(p)}")
    if want("sparse"):
        ctx, g, h = fresh()
        with ctx as p:
            start = mb(p)
            c = attacks.Client(f"127.0.0.1:{g}")
            out = attacks.sparse_scatter(c, 4096)
            time.sleep(2)
            print(
                f"sparse: 4 x 2 MB messages, world_size 4096: {statuses(out)}; {start} -> {mb(p)}"
            )
    if want("long_names"):
        ctx, g, h = fresh()
        with ctx as p:
            start = mb(p)
            c = attacks.Client(f"127.0.0.1:{g}")
            out = attacks.long_names(c, 100)
            body, took = scrape(h)
            print(
                f"long_names: 100 stats-only Pushes with 1 MiB node names: {statuses(out)}; "
                f"{start} -> {mb(p)}; /metrics {len(body) / 1e6:.1f} MB in {took:.1f} s"
            )
    if want("forgery"):
        ctx, g, h = fresh()
        with ctx:
            c = attacks.Client(f"127.0.0.1:{g}")
            o1 = attacks.forged_node(c)
            o2 = attacks.forged_counters(c)
            v = value(scrape(h)[0], "epwatch_agent_records_dropped_total", node="victim")
            print(
                f"forgery (no credentials): node-0 batch from agent 'evil': {o1.status}; "
                f"drop counters 2^64-1: {o2.status}, /metrics shows {v}"
            )
    if want("forgery") and not before:
        from pathlib import Path

        import grpc

        from tests.certs import TestPKI

        with tempfile.TemporaryDirectory() as d:
            pki = TestPKI(Path(d))
            server, evil = pki.server(), pki.client("evil")
            tls = [
                f"--tls-cert={server.cert}",
                f"--tls-key={server.key}",
                f"--tls-client-ca={pki.ca}",
            ]
            ctx, g, h = fresh(*tls)
            with ctx:
                creds = grpc.ssl_channel_credentials(
                    pki.ca.read_bytes(), evil.key.read_bytes(), evil.cert.read_bytes()
                )
                c = attacks.Client(f"127.0.0.1:{g}", creds, server_name="localhost")
                o1 = attacks.forged_node(c)
                o2 = attacks.Client(f"127.0.0.1:{g}").push(b"", timeout=5)
                counted = value(scrape(h)[0], "epwatch_ingest_rejected_total", reason="identity")
                print(
                    f"forgery (mTLS): node-0 batch with the certificate of 'evil': {o1.status}"
                    f" (reason identity counted {counted}); plaintext client: {o2.status}"
                )
    if want("idle_streams"):
        ctx, g, h = fresh()
        with ctx:
            c = attacks.Client(f"127.0.0.1:{g}")
            release = attacks.idle_streams(c, 256)
            time.sleep(1)
            legit = attacks.Client(f"127.0.0.1:{g}")
            recs = make_records(16, 16)
            o = legit.push(
                attacks.batch_message("ep0", 16, recs, seq=1, agent_id="legit"), timeout=5
            )
            release()
            print(
                f"idle_streams: 256 idle Streams, then a legitimate Push: {o.status} "
                f"{o.detail[:60]}"
            )
    if want("junk_groups"):
        ctx, g, h = fresh(*([] if before else ["--new-group-grace=3"]))
        with ctx:
            c = attacks.Client(f"127.0.0.1:{g}")
            out = attacks.junk_groups(c, 64)
            recs = make_records(16, 16)
            o = c.push(attacks.batch_message("real", 16, recs, seq=1, agent_id="real"))
            time.sleep(4)  # past the grace (after the fix: --new-group-grace 3)
            o2 = c.push(attacks.batch_message("real", 16, recs, seq=2, agent_id="real"))
            print(
                f"junk_groups: 64 junk group names: {statuses(out)}; then a real group: "
                f"{o.status} {o.detail[:50]}; 4 s later: {o2.status}"
            )
    if want("agent_churn"):
        ctx, g, h = fresh()
        with ctx:
            c = attacks.Client(f"127.0.0.1:{g}")
            from epwatch.protos import epwatch_pb2 as pb

            real = pb.AgentMessage(
                agent_id="real-agent", node="real-node", stats=pb.AgentStats(records_dropped=5)
            )
            c.push(real.SerializeToString())
            v0 = value(scrape(h)[0], "epwatch_agent_records_dropped_total", node="real-node")
            ok = attacks.agent_churn(c, 10_001)
            v1 = value(scrape(h)[0], "epwatch_agent_records_dropped_total", node="real-node")
            print(
                f"agent_churn: 10,001 agent ids ({ok} accepted): real node's drop counter "
                f"{v0} -> {v1}"
            )
    if want("validation"):
        ctx, g, h = fresh()
        with ctx:
            c = attacks.Client(f"127.0.0.1:{g}")
            w = attacks.wrapped_duration(c)
            s = attacks.unsequenced_batch_twice(c)
            time.sleep(0.5)
            n = value(scrape(h)[0], "epwatch_ingest_records_total", ep_group="seq0")
            print(
                f"validation: wrapped duration: {w.status}; seq=0 batch twice: {statuses(s)}, "
                f"records counted {n} (4 sent)"
            )


def run_agent_attacks(before: bool, only: set[str], workdir: str) -> None:
    def want(name: str) -> bool:
        return not only or name in only

    sock = f"{workdir}/a.sock"
    if want("socket"):
        g, h = free_port(), free_port()
        with collector(g, h), agent(g, sock, free_port()) as p:
            mode = oct(os.stat(sock).st_mode & 0o777)
            frame = hook_frame("ep0", 16, make_records(32, 16))
            sent = attacks.send_as_user(sock, 65534, 65534, frame)
            time.sleep(1)
            n = value(scrape(h)[0], "epwatch_ingest_records_total", ep_group="ep0")
            print(
                f"socket: mode {mode}; frame from uid nobody: {sent}, collector counted {n} "
                f"of its 32 records"
            )
    if want("emfile"):
        g, h, ah = free_port(), free_port(), free_port()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

        with collector(g, h), agent(g, sock, ah, preexec=limit) as p:
            held = attacks.exhaust_descriptors(sock, 1070)
            time.sleep(1)
            for s in held:
                s.close()
            time.sleep(1)
            got = "refused"
            with contextlib.suppress(OSError), contextlib.closing(attacks.connect(sock)) as s:
                s.sendall(hook_frame("ep0", 16, make_records(32, 16)))
                got = "sent"
            time.sleep(1.5)
            n = value(scrape(ah)[0], "epwatch_agent_records_received_total")
            print(
                f"emfile: RLIMIT_NOFILE 1024, 1070 idle connections opened ({len(held)} "
                f"connected); afterwards a rank's frame: {got}, agent received {n} of 32"
            )
    if want("announce"):
        g, h = free_port(), free_port()
        with collector(g, h), agent(g, sock, free_port()) as p:
            start = mb(p)
            held = attacks.announce_huge_frames(sock, 6)
            time.sleep(2)
            print(f"announce: 6 clients announce 64 MiB frames: {start} -> {mb(p)}")
            for s in held:
                s.close()
    if want("spool"):
        ah = free_port()
        extra = [] if before else ["--spool-bytes=32MiB"]
        with agent(free_port(), sock, ah, *extra) as p:  # no collector: everything spools
            start = mb(p)
            sent = attacks.peer_row_frames(sock, 300)
            time.sleep(2)
            spooled = value(scrape(ah)[0], "epwatch_agent_spool_records")
            body = scrape(ah)[0]
            dropped = value(body, "epwatch_agent_messages_dropped_total", reason="spool_full")
            print(
                f"spool: 300 peer-row frames ({sent / 2**20:.0f} MiB), collector down: "
                f"{start} -> {mb(p)}; spool_records {spooled}; messages dropped {dropped}"
            )
    if want("oversized"):
        g, h, ah = free_port(), free_port(), free_port()
        with collector(g, h, "--max-message-bytes=1048576"), agent(g, sock, ah) as p:
            attacks.peer_row_frames(sock, 1, rows=1024)  # one 4 MiB peer-row frame
            time.sleep(15)
            body = scrape(ah)[0]
            rec = value(body, "epwatch_agent_reconnects_total")
            rejected = {
                dict(k).get("reason"): v
                for k, v in attacks_samples(scrape(h)[0], "epwatch_ingest_rejected_total").items()
                if v
            }
            split = value(body, "epwatch_agent_messages_split_total")
            print(
                f"oversized: a 4 MiB batch, collector limit 1 MiB, 15 s: agent reconnects "
                f"{rec}, collector rejected {rejected}, agent split {split}"
            )


def attacks_samples(text: str, name: str) -> dict:
    from tests.helpers import samples

    return samples(text, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", action="store_true", help="only the flags an older epwatch has")
    ap.add_argument("--only", nargs="*", default=[], help="attack names to run")
    args = ap.parse_args()
    only = set(args.only)
    run_collector_attacks(args.before, only)
    with tempfile.TemporaryDirectory(prefix="epw") as d:
        os.chmod(d, 0o755)  # another user must reach the socket's folder
        run_agent_attacks(args.before, only, d)


if __name__ == "__main__":
    main()
