"""``epwatch collector``: gRPC ingest, estimators, /metrics, optional Parquet recording."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from prometheus_client import disable_created_metrics

from collector.recorder import RecorderConfig
from collector.service import CollectorConfig, CollectorService

log = logging.getLogger("epwatch.collector")


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _grpc_listen(value: str) -> str:
    parse_hostport(value)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grpc-listen",
        type=_grpc_listen,
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="gRPC address for agents (default %(default)s; port 0 picks a free one)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=parse_hostport,
        default=("127.0.0.1", 9401),
        metavar="HOST:PORT",
        help="Prometheus /metrics address (default 127.0.0.1:9401)",
    )
    parser.add_argument(
        "--update-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between estimator passes (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 << 20,
        metavar="N",
        help="larger messages are rejected with INVALID_ARGUMENT (default 64 MiB)",
    )
    parser.add_argument(
        "--max-groups",
        type=int,
        default=64,
        metavar="N",
        help="EP groups this collector accepts (default %(default)s)",
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=256,
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
        type=int,
        default=256 << 20,
        metavar="N",
        help="rotate a recording after this many bytes (default 256 MiB)",
    )
    parser.add_argument(
        "--record-max-seconds",
        type=float,
        default=3600.0,
        metavar="S",
        help="rotate a recording after this many seconds (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
    service = CollectorService(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    print(
        f"epwatch collector ready: grpc port {service.grpc_port}, "
        f"metrics port {service.metrics_port}",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    service.stop()
    return 0
