"""``epwatch agent``: the per-node daemon (hook socket, samplers, shipping)."""

from __future__ import annotations

import argparse
import grp
import json
import logging
import pwd
import socket
from collections.abc import Callable

from epwatch.agent.daemon import Agent, AgentConfig, SampleRound
from epwatch.agent.receiver import SocketPolicy
from epwatch.agent.samplers import registry
from epwatch.agent.samplers.runner import make_sample_round
from epwatch.agent.shipper import ClientSecurity
from epwatch.cliargs import (
    add_log_level_argument,
    byte_size,
    hostport_text,
    load_web_config_flag,
    parse_hostport,
    positive,
    raise_open_files_limit,
    setup_logging,
    stop_on_signals,
)
from epwatch.credentials import load_flag_files
from epwatch.frames import default_socket_path
from epwatch.memory import tune_malloc
from epwatch.names import name_error
from epwatch.webserver import is_loopback, warn_if_exposed

log = logging.getLogger("epwatch.agent")

D = AgentConfig  # the defaults below are the config's own


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--collector",
        default=D.collector,
        type=hostport_text,
        metavar="HOST:PORT",
        help="collector gRPC address (default %(default)s)",
    )
    parser.add_argument(
        "--node",
        default=socket.gethostname(),
        help="this node's name in every series (default: the hostname)",
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help="Unix socket for hook frames (default $EPWATCH_AGENT_SOCKET, else "
        "/run/epwatch/agent.sock, else $TMPDIR/epwatch-agent.sock)",
    )
    parser.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default=D.socket_mode,
        metavar="OCTAL",
        help="permissions of the socket (default %(default)o: the agent's user and the "
        "socket's group; give the serving engine's user that group, see --socket-group)",
    )
    parser.add_argument(
        "--spool-bytes",
        type=byte_size,
        default=D.spool_bytes,
        metavar="BYTES",
        help="serialized messages kept until acked, counted at their real size; beyond "
        "it the oldest unsent are dropped and counted (default %(default)s)",
    )
    parser.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="keep the spool on disk too (append-only, checksummed): a killed or rebooted "
        "agent delivers what it had accepted (default: in memory only; a crash loses it, "
        "counted at the next start)",
    )
    parser.add_argument(
        "--spool-records",
        type=positive(int),
        default=D.spool_records,
        metavar="N",
        help="records kept until acked; beyond it the oldest unsent are dropped and "
        "counted (default %(default)s)",
    )
    parser.add_argument(
        "--batch-records",
        type=positive(int),
        default=D.batch_records,
        metavar="N",
        help="records per shipped batch (default %(default)s)",
    )
    parser.add_argument(
        "--flush-interval",
        type=positive(float),
        default=D.flush_interval_s,
        metavar="S",
        help="ship a partial batch after this many seconds (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=parse_hostport,
        default=None,
        metavar="HOST:PORT",
        help="serve the agent's own /metrics here (default: off)",
    )
    parser.add_argument(
        "--backoff-max",
        type=positive(float),
        default=D.backoff_max_s,
        metavar="S",
        help="longest reconnect backoff (default %(default)s)",
    )
    parser.add_argument(
        "--sample-interval",
        type=positive(float),
        default=D.sample_interval_s,
        metavar="S",
        help="seconds between node sampler rounds (default %(default)s)",
    )
    parser.add_argument(
        "--sample-once",
        action="store_true",
        help="run one sampler round, print it and exit",
    )
    parser.add_argument("--json", action="store_true", help="with --sample-once: JSON output")
    add_log_level_argument(parser)
    add_socket_arguments(parser)
    add_transport_arguments(parser)
    registry.add_sampler_arguments(parser)


def _ids(kind: str, lookup: Callable[[str], int]) -> Callable[[str], int]:
    """An argparse type: a number, or a user/group name."""

    def parse(text: str) -> int:
        if text.isdigit():
            return int(text)
        try:
            return lookup(text)
        except KeyError:
            raise argparse.ArgumentTypeError(f"no {kind} named {text!r}") from None

    return parse


def add_socket_arguments(parser: argparse.ArgumentParser) -> None:
    p = SocketPolicy()
    g = parser.add_argument_group("hook socket trust (docs/security.md)")
    g.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group owner of the socket; its members may send (default: the agent's group)",
    )
    g.add_argument(
        "--allow-uid",
        action="append",
        metavar="UID",
        type=_ids("user", lambda n: pwd.getpwnam(n).pw_uid),
        help="a user whose processes may send frames (repeatable; default: root "
        "and the agent's user)",
    )
    g.add_argument(
        "--allow-gid",
        action="append",
        metavar="GID",
        type=_ids("group", lambda n: grp.getgrnam(n).gr_gid),
        help="a group whose members may send frames (repeatable; default: the socket's group)",
    )
    g.add_argument(
        "--max-frame-bytes",
        type=byte_size,
        default=p.max_frame_bytes,
        metavar="BYTES",
        help="largest hook frame (default %(default)s)",
    )
    g.add_argument(
        "--client-bytes-per-second",
        type=byte_size,
        default=int(p.bytes_per_s),
        metavar="BYTES",
        help="read rate per hook connection; a faster sender waits (default %(default)s)",
    )
    g.add_argument(
        "--max-clients",
        type=positive(int),
        default=p.max_clients,
        metavar="N",
        help="hook connections at once (default %(default)s)",
    )


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("transport security (docs/security.md)")
    g.add_argument(
        "--tls-ca", metavar="PEM", help="connect to the collector over TLS, trusting this CA"
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="client certificate for mTLS; it must name this node (DNS SAN or CN)",
    )
    g.add_argument("--tls-key", metavar="PEM", help="the client certificate's key")
    g.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name to expect on the collector's certificate (default: the host of --collector)",
    )
    g.add_argument(
        "--token-file", metavar="FILE", help="send this bearer token in the authorization metadata"
    )
    g.add_argument(
        "--web-config",
        metavar="FILE",
        help="TLS, client certificates and basic auth for --metrics-listen, in the "
        "Prometheus exporter-toolkit format",
    )


def client_security(args: argparse.Namespace) -> ClientSecurity:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("epwatch agent: --tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise SystemExit("epwatch agent: --tls-cert needs --tls-ca (the collector's CA)")
    files, token = load_flag_files(
        "agent",
        {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key},
        args.token_file,
    )
    return ClientSecurity(
        ca=files["--tls-ca"],
        cert=files["--tls-cert"],
        key=files["--tls-key"],
        token=token,
        server_name=args.tls_server_name,
    )


def socket_policy(args: argparse.Namespace) -> SocketPolicy:
    if args.socket_group:
        try:
            grp.getgrnam(args.socket_group)
        except KeyError:
            raise SystemExit(f"epwatch agent: no group named {args.socket_group!r}") from None
    return SocketPolicy(
        mode=args.socket_mode,
        group=args.socket_group,
        allow_uids=frozenset(args.allow_uid) if args.allow_uid else None,
        allow_gids=frozenset(args.allow_gid) if args.allow_gid else None,
        max_frame_bytes=args.max_frame_bytes,
        bytes_per_s=float(args.client_bytes_per_second),
        max_clients=args.max_clients,
    )


def _sample_once(args: argparse.Namespace) -> int:
    samplers = registry.build_samplers(args)
    result = registry.sample_once(samplers)
    print(json.dumps(result, default=str, indent=None if args.json else 2))
    return 0


def _sample_round(args: argparse.Namespace) -> tuple[SampleRound | None, Callable[[], None]]:
    """The enabled samplers' round function (None when there is none) and its release."""
    samplers = registry.build_samplers(args)
    if not samplers:
        return None, lambda: None
    return make_sample_round(samplers, args.sample_interval)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if args.sample_once:
        return _sample_once(args)
    why = name_error(args.node)
    if why is not None:
        raise SystemExit(f"epwatch agent: --node {args.node[:40]!r} {why}")
    raise_open_files_limit()
    tune_malloc()
    security = client_security(args)
    host = parse_hostport(args.collector)[0]
    if not (security.tls or security.token):
        warn_if_exposed(
            "the stream to the collector",
            host,
            False,
            "--tls-ca with --tls-cert/--tls-key (mTLS), or --token-file",
        )
    elif security.token and not security.tls and not is_loopback(host):
        log.warning("--token-file without --tls-ca sends the token in plaintext; add --tls-ca")
    config = AgentConfig(
        collector=args.collector,
        node=args.node,
        socket_path=args.socket or default_socket_path(),
        socket_mode=args.socket_mode,
        socket=socket_policy(args),
        security=security,
        spool_bytes=args.spool_bytes,
        spool_dir=args.spool_dir,
        spool_records=args.spool_records,
        batch_records=args.batch_records,
        flush_interval_s=args.flush_interval,
        sample_interval_s=args.sample_interval,
        backoff_max_s=args.backoff_max,
    )
    web = load_web_config_flag(args.web_config, "agent")
    sample_round, close_samplers = _sample_round(args)
    try:
        agent = Agent(config, sample_round)
    except OSError as err:  # the spool folder or the socket
        raise SystemExit(f"epwatch agent: {err}") from None
    metrics_server = None
    if args.metrics_listen is not None:
        from epwatch.agent.metrics import serve_metrics

        metrics_server = serve_metrics(agent, *args.metrics_listen, security=web)
        log.info("agent /metrics on %s:%d", args.metrics_listen[0], metrics_server.port)
    stop = stop_on_signals()
    agent.start()
    print(f"epwatch agent {agent.agent_id} ready on {config.socket_path}", flush=True)
    stop.wait()
    log.info("shutting down")
    agent.stop()
    close_samplers()
    if metrics_server is not None:
        metrics_server.stop()
    return 0
