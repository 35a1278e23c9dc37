"""``epwatch agent``: the per-node daemon (hook socket, samplers, shipping)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent.daemon import Agent, AgentConfig, SampleRound
from agent.frames import default_socket_path
from epwatch.cliargs import hostport_text, parse_hostport, positive

if TYPE_CHECKING:
    from agent.samplers.base import Sampler

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

log = logging.getLogger("epwatch.agent")


def _samplers_module() -> Any | None:
    """``agent.samplers.registry`` (absent in a hooks-only install)."""
    try:
        from agent.samplers import registry
    except ImportError:
        return None
    return registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--collector",
        default="127.0.0.1:50051",
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
        default=0o666,
        metavar="OCTAL",
        help="permissions of the socket: who may send hook records (default 666, any "
        "local user: engines often run as another user; 660 with a shared group is "
        "stricter)",
    )
    parser.add_argument(
        "--spool-records",
        type=positive(int),
        default=1_000_000,
        metavar="N",
        help="records kept until acked; beyond it the oldest unsent are dropped and "
        "counted (default %(default)s)",
    )
    parser.add_argument(
        "--batch-records",
        type=positive(int),
        default=16_384,
        metavar="N",
        help="records per shipped batch (default %(default)s)",
    )
    parser.add_argument(
        "--flush-interval",
        type=positive(float),
        default=0.2,
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
        default=5.0,
        metavar="S",
        help="longest reconnect backoff (default %(default)s)",
    )
    parser.add_argument(
        "--sample-interval",
        type=positive(float),
        default=1.0,
        metavar="S",
        help="seconds between node sampler rounds (default %(default)s)",
    )
    parser.add_argument(
        "--sample-once",
        action="store_true",
        help="run one sampler round, print it and exit",
    )
    parser.add_argument("--json", action="store_true", help="with --sample-once: JSON output")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default %(default)s)")  # fmt: skip
    registry = _samplers_module()
    if registry is not None:
        registry.add_sampler_arguments(parser)


def _sample_once(args: argparse.Namespace) -> int:
    registry = _samplers_module()
    if registry is None:
        print("node samplers are not available in this build", file=sys.stderr)
        return 2
    samplers = registry.build_samplers(args)
    result = registry.sample_once(samplers)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def make_sample_round(
    samplers: Sequence[Sampler], interval_s: float
) -> tuple[SampleRound, Callable[[], None]]:
    """The :class:`Agent`'s round function over ``samplers``, and how to release them.

    A :class:`RoundRunner` is kept across rounds so that a sampler stuck in a driver
    call is reported failed and not started again until that call returns; a round
    gets 80% of the interval (at least 0.2 s) before its stragglers count as failed.
    """
    from agent.samplers import registry

    runner = registry.RoundRunner(samplers, timeout_s=max(0.2, 0.8 * interval_s))

    def one_round() -> tuple[list[Any], list[Any]]:
        results = runner.run()
        points = []
        for r in results:
            points.extend(r.points)
            points.extend(registry.status_points(r))
        return points, results

    def close() -> None:
        runner.close()
        registry.close_samplers(samplers)

    return one_round, close


def _sample_round(args: argparse.Namespace) -> tuple[SampleRound | None, Callable[[], None]]:
    """The enabled samplers' round function (None when there is none) and its release."""
    registry = _samplers_module()
    if registry is None:
        log.warning("node samplers unavailable: shipping hook records only")
        return None, lambda: None
    samplers = registry.build_samplers(args)
    if not samplers:
        return None, lambda: None
    return make_sample_round(samplers, args.sample_interval)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
        from agent.metrics import serve_metrics

        metrics_server, port = serve_metrics(agent, *args.metrics_listen)
        log.info("agent /metrics on %s:%d", args.metrics_listen[0], port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    print(f"epwatch agent {agent.agent_id} ready on {config.socket_path}", flush=True)
    stop.wait()  # the signal handler runs in this thread and sets it: no need to poll
    log.info("shutting down")
    agent.stop()
    close_samplers()
    if metrics_server is not None:
        metrics_server.shutdown()  # type: ignore[attr-defined]
    return 0
