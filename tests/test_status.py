"""``epwatch status`` against the live demo, and its errors when no collector answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from epwatch.cli import main
from epwatch.cliargs import free_port
from epwatch.webserver import WebServer
from tests.helpers import start_collector

SLOW, HOT = (13, "node-1", "compute"), (29, "node-3", "routing")


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "status", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_unreachable_collector_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["status", "--collector-url", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the collector at http://127.0.0.1:{port}/api/v1/diagnosis" in err
    assert "Connection refused" in err and "--metrics-listen" in err
    assert main(["status", "--collector-url", "ftp://x"]) == 1
    assert "not an http(s) URL" in capsys.readouterr().err


def test_a_server_without_the_api_is_named_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    server = WebServer(CollectorRegistry(), "127.0.0.1", 0).start()  # /metrics only
    try:
        assert main(["status", "--collector-url", f"http://127.0.0.1:{server.port}"]) == 1
    finally:
        server.stop()
    assert "404, no diagnosis API there" in capsys.readouterr().err


def flags(port: int) -> set[tuple[int, str, str]]:
    url = f"http://127.0.0.1:{port}/api/v1/diagnosis"
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    return {
        (s["rank"], s["node"], s["cause"])
        for g in doc["groups"]
        for s in g["stragglers"]
        if s["active"]
    }


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_live_api_and_status_while_the_demo_runs() -> None:
    """The default story on 32 ranks (shortened): the API lists the slow GPU's rank 13
    as compute and the hot expert's rank 29 as routing while the demo still runs, and
    `status` prints them, once and with --watch."""
    port = free_port()
    demo = subprocess.Popen(
        [
            sys.executable, "-m", "epwatch.cli", "demo", "--ranks=32", "--layers=4",
            "--steps-per-second=10", "--duration=40", f"--metrics-listen=127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        seen: set[tuple[int, str, str]] = set()
        while not {SLOW, HOT} <= seen:
            assert demo.poll() is None, demo.communicate()
            assert time.monotonic() < deadline, f"API flags: {seen}"
            time.sleep(0.5)
            try:
                seen = flags(port)
            except OSError:
                continue
        assert seen == {SLOW, HOT}  # and nothing else

        once = status("--collector-url", f"http://127.0.0.1:{port}")
        assert once.returncode == 0, once.stderr
        assert "rank 13 on node-1: compute, since step" in once.stdout
        assert "rank 29 on node-3: routing, since step" in once.stdout

        watching = subprocess.Popen(
            [sys.executable, "-m", "epwatch.cli", "status", "--collector-url",
             f"127.0.0.1:{port}", "--watch", "0.5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(4)
        watching.send_signal(signal.SIGINT)
        out, err = watching.communicate(timeout=20)
        assert watching.returncode == 0, err
        frames = out.split("\x1b[H\x1b[2J")
        assert len(frames) >= 3, out  # redrawn in place
        last = frames[-1]
        assert "EP group demo: 32 ranks" in last and "γ p50" in last
        assert "rank   13 on node-1: compute" in last and "rank   29 on node-3: routing" in last
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.communicate(timeout=60)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert demo.returncode == 0


def test_status_reads_a_collector_behind_web_config_and_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real collector whose --web-config asks for TLS (a private CA), a client
    certificate and bcrypt basic auth: status reads the diagnosis with --ca-file,
    --cert-file/--key-file, --user and --password-file, and each missing piece is a
    clear error naming the flag that supplies it."""
    bcrypt = pytest.importorskip("bcrypt")
    pytest.importorskip("cryptography")
    from epwatch.webconfig import load_web_config
    from tests.certs import TestPKI

    pki = TestPKI(tmp_path / "pki")
    server, client = pki.server(), pki.client("ops")
    hashed = bcrypt.hashpw(b"s3cret pass", bcrypt.gensalt(4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {server.cert}\n  key_file: {server.key}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
        f"basic_auth_users:\n  ops: '{hashed}'\n"
    )
    password, wrong = tmp_path / "password", tmp_path / "wrong"
    password.write_text("s3cret pass\n")
    wrong.write_text("s3cret\n")
    password.chmod(0o600)
    wrong.chmod(0o600)
    svc = start_collector(metrics=True, web=load_web_config(config))
    url = f"https://localhost:{svc.metrics_port}"
    ca = ["--ca-file", str(pki.ca)]
    cert = ["--cert-file", str(client.cert), "--key-file", str(client.key)]
    user = ["--user", "ops", "--password-file", str(password)]

    def status_of(*args: str) -> tuple[int, str, str]:
        code = main(["status", "--collector-url", url, "--timeout", "5", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    try:
        code, out, _ = status_of(*ca, *cert, *user, "--json")
        assert code == 0 and json.loads(out) == {"groups": []}
        code, out, _ = status_of(*ca, *cert, *user)
        assert code == 0 and "no EP group yet" in out

        failures = {
            "pass the CA that signed it with --ca-file": (*cert, *user),
            "pass --cert-file and --key-file": (*ca, *user),
            "requires basic auth (its --web-config has basic_auth_users): pass --user and "
            "--password-file": (*ca, *cert),
            "401, the user or password was refused": (
                *ca, *cert, "--user", "ops", "--password-file", str(wrong)
            ),
        }  # fmt: skip
        for message, args in failures.items():
            code, out, err = status_of(*args)
            assert code == 1 and out == "", err
            assert err.startswith("epwatch status: ") and message in err, err
            assert "s3cret" not in err
        # plain http on the TLS port: a hang-up, with the hint to use https://
        plain = main(["status", "--collector-url", f"http://127.0.0.1:{svc.metrics_port}"])
        assert plain == 1 and "use an https:// --collector-url" in capsys.readouterr().err
    finally:
        svc.stop(grace_s=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cert-file", "c.pem"], "--cert-file and --key-file go together"),
        (["--user", "ops"], "--user and --password-file go together"),
        (["--password-file", "p"], "--user and --password-file go together"),
        (["--ca-file", "ca.pem"], "--ca-file is for TLS: give an https:// --collector-url"),
        (["--user", "ops", "--password-file", "/nonexistent/p"], "cannot read --password-file"),
    ],
)
def test_status_credential_flags_are_checked_before_asking(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens: the flags fail first, not the connection
    assert main(["status", "--collector-url", f"127.0.0.1:{port}", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "cannot reach" not in err


def test_status_takes_no_password_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not even as an abbreviation of --password-file: a password typed there is
    refused, never read as a file name."""
    for args in (["--password=x"], ["--password", "x"], ["--pass", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["status", "--user", "ops", *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and "cannot read" not in err
