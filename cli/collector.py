"""``epwatch collector``: gRPC ingest, estimators, /metrics, optional Parquet recording."""

from __future__ import annotations

import argparse
import logging

from prometheus_client import disable_created_metrics

from epwatch.cliargs import (
    add_log_level_argument,
    hostport_text,
    parse_hostport,
    positive,
    setup_logging,
    stop_on_signals,
)
from epwatch.collector.estimators.config import EstimatorConfig
from epwatch.collector.groups import default_factory
from epwatch.collector.recorder import RecorderConfig
from epwatch.collector.service import CollectorConfig, CollectorService

log = logging.getLogger("epwatch.collector")

D, R = CollectorConfig, RecorderConfig  # the defaults below are the configs' own


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grpc-listen",
        type=hostport_text,
        default=D.grpc_listen,
        metavar="HOST:PORT",
        help="gRPC address for agents (default %(default)s; port 0 picks a free one)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=parse_hostport,
        default=D.metrics_listen,
        metavar="HOST:PORT",
        help="Prometheus /metrics address (default {}:{})".format(*D.metrics_listen),
    )
    parser.add_argument(
        "--update-interval",
        type=positive(float),
        default=D.update_interval_s,
        metavar="S",
        help="seconds between estimator passes (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=positive(int),
        default=D.max_message_bytes,
        metavar="N",
        help="larger messages are rejected with INVALID_ARGUMENT (default %(default)s)",
    )
    parser.add_argument(
        "--max-groups",
        type=positive(int),
        default=D.max_groups,
        metavar="N",
        help="EP groups this collector accepts (default %(default)s)",
    )
    parser.add_argument(
        "--max-streams",
        type=positive(int),
        default=D.max_streams,
        metavar="N",
        help="concurrent agent streams (default %(default)s)",
    )
    parser.add_argument(
        "--record",
        metavar="DIR",
        default=None,
        help="append accepted raw records to Parquet files in DIR",
    )
    parser.add_argument(
        "--record-max-bytes",
        type=positive(int),
        default=R.max_file_bytes,
        metavar="N",
        help="rotate a recording after this many bytes (default %(default)s)",
    )
    parser.add_argument(
        "--record-max-seconds",
        type=positive(float),
        default=R.max_file_seconds,
        metavar="S",
        help="rotate a recording after this many seconds (default %(default)s)",
    )
    add_log_level_argument(parser)
    add_estimator_arguments(parser)


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """The diagnosis thresholds an operator may need to tune for their fleet."""
    d = EstimatorConfig()
    g = parser.add_argument_group("diagnosis")
    g.add_argument(
        "--window-steps",
        type=int,
        default=d.window_steps,
        metavar="N",
        help="steps behind gamma/skew quantiles and the Hockney fits (default %(default)s)",
    )
    g.add_argument(
        "--confirm-steps",
        type=int,
        default=d.confirm_steps,
        metavar="N",
        help="consecutive steps evidence must hold to flag or clear a rank (default %(default)s)",
    )
    g.add_argument(
        "--compute-threshold",
        type=float,
        default=d.compute_threshold,
        metavar="RATIO",
        help="per-token compute cost over the group median that "
        "flags a slow GPU (default %(default)s; raised automatically when the "
        "group is noisier)",
    )
    g.add_argument(
        "--routing-threshold",
        type=float,
        default=d.routing_threshold,
        metavar="RATIO",
        help="routed load over the mean that flags a hot-expert rank (default %(default)s)",
    )
    g.add_argument(
        "--network-threshold",
        type=float,
        default=d.network_threshold,
        metavar="RATIO",
        help="link time over the group's that flags a slow NIC or link (default %(default)s)",
    )
    g.add_argument("--hang-after", type=float, default=d.hang_after_s, metavar="S",
                   help="seconds without progress before a lagging rank is a hang "
                        "(default %(default)s)")  # fmt: skip


def estimator_config(args: argparse.Namespace) -> EstimatorConfig:
    try:
        return EstimatorConfig(
            window_steps=args.window_steps,
            confirm_steps=args.confirm_steps,
            compute_threshold=args.compute_threshold,
            routing_threshold=args.routing_threshold,
            network_threshold=args.network_threshold,
            hang_after_s=args.hang_after,
        )
    except ValueError as err:
        raise SystemExit(f"epwatch collector: {err}") from None


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    record = None
    if args.record:
        record = RecorderConfig(
            args.record,
            max_file_bytes=args.record_max_bytes,
            max_file_seconds=args.record_max_seconds,
        )
    disable_created_metrics()  # no *_created twin per counter series: half the noise
    config = CollectorConfig(
        grpc_listen=args.grpc_listen,
        metrics_listen=args.metrics_listen,
        update_interval_s=args.update_interval,
        max_message_bytes=args.max_message_bytes,
        max_groups=args.max_groups,
        max_streams=args.max_streams,
        record=record,
    )
    service = CollectorService(config, default_factory(estimator_config(args)))
    stop = stop_on_signals()
    service.start()
    print(
        f"epwatch collector ready: grpc port {service.grpc_port}, "
        f"metrics port {service.metrics_port}",
        flush=True,
    )
    stop.wait()
    log.info("shutting down")
    service.stop()
    return 0
