"""``epwatch collector``: gRPC ingest, estimators, /metrics, optional Parquet recording."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from prometheus_client import disable_created_metrics

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
from epwatch.collector.estimators.config import EstimatorConfig
from epwatch.collector.groups import default_factory
from epwatch.collector.recorder import RecorderConfig, RecorderError
from epwatch.collector.server import ServerSecurity
from epwatch.collector.service import CollectorConfig, CollectorService
from epwatch.credentials import load_flag_files
from epwatch.memory import tune_malloc

log = logging.getLogger("epwatch.collector")

D = CollectorConfig  # the defaults below are the configs' own
# RecorderConfig has slots: its defaults live on its fields, not on the class.
R = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(RecorderConfig)})


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
    add_limit_arguments(parser)
    add_security_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Hard bounds on what agents can make the collector hold (docs/security.md)."""
    e = EstimatorConfig()
    g = parser.add_argument_group("limits")
    g.add_argument(
        "--max-world-size",
        type=positive(int),
        default=D.max_world_size,
        metavar="N",
        help="largest EP group accepted (default %(default)s)",
    )
    g.add_argument(
        "--max-layers",
        type=positive(int),
        default=e.max_layers,
        metavar="N",
        help="MoE layers per step assembled; records of higher layers are "
        "ignored and counted (default %(default)s)",
    )
    g.add_argument(
        "--group-buffer-bytes",
        type=byte_size,
        default=e.buffer_bytes,
        metavar="BYTES",
        help="memory one EP group's step assembly may use, a hard bound (default %(default)s)",
    )
    g.add_argument(
        "--buffer-bytes",
        type=byte_size,
        default=D.buffer_bytes,
        metavar="BYTES",
        help="memory all groups' step assembly may use together; a new group "
        "that does not fit is refused (default %(default)s)",
    )
    g.add_argument(
        "--new-group-grace",
        type=positive(float),
        default=D.new_group_grace_s,
        metavar="S",
        help="when every group slot is taken, a group that has "
        "completed no step for this long gives its slot to a new one; such a "
        "group idle this long is forgotten (default %(default)s)",
    )
    g.add_argument(
        "--streams-per-peer",
        type=positive(int),
        default=D.streams_per_peer,
        metavar="N",
        help="open streams per client certificate, else per client address (default %(default)s)",
    )
    g.add_argument(
        "--stream-idle-timeout",
        type=positive(float),
        default=D.stream_idle_s,
        metavar="S",
        help="close a stream silent this long (default %(default)s)",
    )


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("transport security (docs/security.md)")
    g.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate")
    g.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    g.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require agents' client certificates signed by this CA (mTLS); a "
        "certificate's DNS names (else its CN) are the only node names its "
        "agent may send",
    )
    g.add_argument(
        "--token-file",
        metavar="FILE",
        help="require this bearer token in the authorization metadata",
    )
    g.add_argument(
        "--web-config",
        metavar="FILE",
        help="TLS, client certificates and basic auth for /metrics, in the "
        "Prometheus exporter-toolkit format",
    )


def server_security(args: argparse.Namespace) -> ServerSecurity:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("epwatch collector: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("epwatch collector: --tls-client-ca needs --tls-cert and --tls-key")
    files, token = load_flag_files(
        "collector",
        {
            "--tls-cert": args.tls_cert,
            "--tls-key": args.tls_key,
            "--tls-client-ca": args.tls_client_ca,
        },
        args.token_file,
    )
    return ServerSecurity(
        tls_cert=files["--tls-cert"],
        tls_key=files["--tls-key"],
        client_ca=files["--tls-client-ca"],
        token=token,
    )


DIAGNOSIS_HELP = """\
How a rank gets flagged (docs/design.md section 5): each rank's ratio to its group
(per-token expert compute, routed load, NIC time per byte, own batch) is tested step
by step with a CUSUM over its log, in units of that rank's noise (estimated from its
own last --noise-window observations, step to step and over --burst-steps, never
below the group's typical noise). An observation counts as evidence only above the
cause's minimum effect (and above one noise unit); one spike adds at most 2 units.
A flag opens when the evidence reaches --enter-level and clears only after it stayed
below --exit-level for --clear-steps steps and --clear-seconds seconds: a straggler
that stays slow is one episode."""


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """The diagnosis knobs an operator may need to tune for their fleet."""
    d = EstimatorConfig()
    g = parser.add_argument_group("diagnosis", DIAGNOSIS_HELP)
    g.add_argument(
        "--window-steps",
        type=int,
        default=d.window_steps,
        metavar="N",
        help="steps behind gamma/skew quantiles and the Hockney fits (default %(default)s)",
    )
    sequential = (
        ("--noise-window", "noise_window", int, "N",
         "observations behind each rank's noise estimate"),
        ("--burst-steps", "burst_steps", int, "N",
         "noise is also measured over bursts of this many steps, so that a host that "
         "slows a rank for a second now and then does not flag it (1: off)"),
        ("--enter-level", "enter_level", float, "UNITS",
         "evidence, in noise units, that flags a rank; higher is slower to flag and "
         "rarer to flag wrongly"),
        ("--exit-level", "exit_level", float, "UNITS",
         "evidence below which a flagged rank counts as recovered (below --enter-level)"),
        ("--hold-steps", "hold_steps", int, "N",
         "steps evidence must hold (above midway to --enter-level) after reaching it "
         "before the flag opens: a host that slows a rank for a second is no straggler"),
        ("--hold-seconds", "hold_seconds", float, "S", "... and seconds: both must pass"),
        ("--clear-steps", "clear_steps", int, "N",
         "steps a recovered rank must stay below --exit-level before its flag clears"),
        ("--clear-seconds", "clear_seconds", float, "S", "... and seconds: both must pass"),
    )  # fmt: skip
    for flag, name, kind, metavar, what in sequential:
        g.add_argument(
            flag,
            type=kind,
            default=getattr(d, name),
            metavar=metavar,
            help=f"{what} (default %(default)s)",
        )
    effects = (
        ("compute", "per-token expert compute over the group median (a slow GPU)"),
        ("routing", "routed load over the mean load (a hot expert's rank)"),
        ("network", "time per byte of a rank's links, beyond the fitted latency, over "
                    "the group's (a slow NIC)"),
        ("link", "one link's time over what its two ends predict (a slow cable or port); "
                 "listed as a suspect link"),
        ("batch", "a rank's own data-parallel batch over the median, while it enters "
                  "dispatch late (DP imbalance)"),
    )  # fmt: skip
    for cause, what in effects:
        g.add_argument(
            f"--{cause}-min-effect",
            f"--{cause}-threshold",  # the name before the sequential test
            dest=f"{cause}_min_effect",
            type=float,
            default=getattr(d, f"{cause}_min_effect"),
            metavar="RATIO",
            help=f"{what}: the smallest ratio that flags (default %(default)s)",
        )
    g.add_argument("--hang-after", type=float, default=d.hang_after_s, metavar="S",
                   help="seconds without progress before a lagging rank is a hang "
                        "(default %(default)s)")  # fmt: skip


def estimator_config(args: argparse.Namespace) -> EstimatorConfig:
    try:
        return EstimatorConfig(
            window_steps=args.window_steps,
            noise_window=args.noise_window,
            burst_steps=args.burst_steps,
            hold_steps=args.hold_steps,
            hold_seconds=args.hold_seconds,
            enter_level=args.enter_level,
            exit_level=args.exit_level,
            clear_steps=args.clear_steps,
            clear_seconds=args.clear_seconds,
            compute_min_effect=args.compute_min_effect,
            routing_min_effect=args.routing_min_effect,
            network_min_effect=args.network_min_effect,
            link_min_effect=args.link_min_effect,
            batch_min_effect=args.batch_min_effect,
            hang_after_s=args.hang_after,
            max_layers=args.max_layers,
            buffer_bytes=args.group_buffer_bytes,
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
    raise_open_files_limit()
    tune_malloc()
    config = CollectorConfig(
        grpc_listen=args.grpc_listen,
        metrics_listen=args.metrics_listen,
        update_interval_s=args.update_interval,
        max_message_bytes=args.max_message_bytes,
        max_groups=args.max_groups,
        max_streams=args.max_streams,
        record=record,
        max_world_size=args.max_world_size,
        buffer_bytes=args.buffer_bytes,
        new_group_grace_s=args.new_group_grace,
        streams_per_peer=args.streams_per_peer,
        stream_idle_s=args.stream_idle_timeout,
        security=server_security(args),
        web=load_web_config_flag(args.web_config, "collector"),
    )
    try:
        service = CollectorService(config, default_factory(estimator_config(args)))
    except RecorderError as err:
        raise SystemExit(f"epwatch collector: {err}") from None
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
