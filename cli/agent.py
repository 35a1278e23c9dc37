"""``epwatch agent``: the per-node daemon (hook socket, samplers, shipping)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
from collections.abc import Callable

from epwatch.agent.daemon import Agent, AgentConfig, SampleRound
from epwatch.agent.samplers import registry
from epwatch.agent.samplers.runner import make_sample_round
from epwatch.cliargs import (
    add_log_level_argument,
    hostport_text,
    parse_hostport,
    positive,
    setup_logging,
    stop_on_signals,
)
from epwatch.frames import default_socket_path

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
        help="permissions of the socket: who may send hook records (default %(default)o, any "
        "local user: engines often run as another user; 660 with a shared group is "
        "stricter)",
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
    registry.add_sampler_arguments(parser)


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
    config = AgentConfig(
        collector=args.collector,
        node=args.node,
        socket_path=args.socket or default_socket_path(),
        socket_mode=args.socket_mode,
        spool_records=args.spool_records,
        batch_records=args.batch_records,
        flush_interval_s=args.flush_interval,
        sample_interval_s=args.sample_interval,
        backoff_max_s=args.backoff_max,
    )
    sample_round, close_samplers = _sample_round(args)
    agent = Agent(config, sample_round)
    metrics_server = None
    if args.metrics_listen is not None:
        from epwatch.agent.metrics import serve_metrics

        metrics_server = serve_metrics(agent, *args.metrics_listen)
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
