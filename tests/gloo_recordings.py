"""Record the regression data in ``tests/data/recordings``: real gloo runs of the
mini-MoE (``tests/moe_worker.py``: 4 ranks, dropless, count exchange and variable
splits), of fairscale's ``MOELayer`` (``tests/fairscale_worker.py``) and of DeepSpeed's
``AutoEPMoELayer`` (``tests/deepspeed_worker.py``, instrumented by
``patch_all_to_all``) through a real agent and ``epwatch collector --record``.

Each scenario runs on its own collector and leaves ``<name>.parquet`` (the collector's
recording) and ``<name>.json``: what was injected (rank, onset step and time) and what
the live collector showed on /metrics (when each flag appeared, in how many episodes).
With ``--prometheus`` the slow-GPU run is also watched by a real Prometheus and
Alertmanager with the shipped rules, ``for:`` as committed, and the JSON says when
``EPStragglerRank`` went pending and firing.

    .venv/bin/python -m tests.gloo_recordings [--only moe-slow] [--prometheus]

Runs take 60-120 s each; the files stay small (four layers, 4 ranks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.gloo_cluster import GlooCluster
from tests.moe_worker import Scenario

OUT = Path(__file__).resolve().parent / "data" / "recordings"
STEPS = 900  # about 90 s at the mini-MoE's 10 steps per second on two cores
ONSET = 150

SCENARIOS = {
    "moe-healthy": Scenario(group="moe-healthy", steps=STEPS),
    "moe-slow": Scenario(group="moe-slow", steps=STEPS, fault_step=ONSET, slow_rank=2,
                         slow_factor=1.25, slow_mode="spin"),
    "moe-slow-1.2": Scenario(group="moe-slow-1.2", steps=STEPS // 2 + ONSET, fault_step=ONSET,
                             slow_rank=1, slow_factor=1.2, slow_mode="spin"),
    "moe-hot": Scenario(group="moe-hot", steps=STEPS, fault_step=ONSET, hot_rank=1),
    "moe-batch": Scenario(group="moe-batch", steps=STEPS // 2 + ONSET, fault_step=ONSET,
                          batch_rank=3, batch_factor=1.3),
    "moe-hang": Scenario(group="moe-hang", steps=2 * ONSET + 100, hang_rank=3,
                         hang_step=2 * ONSET),
    # fairscale's MOELayer + Top2Gate: real CPU compute, nothing slept (see its worker).
    "fs-healthy": Scenario(group="fs-healthy", steps=STEPS),
    "fs-slow": Scenario(group="fs-slow", steps=STEPS, fault_step=ONSET, slow_rank=2,
                        slow_factor=1.3, slow_mode="spin"),
    "fs-hot": Scenario(group="fs-hot", steps=STEPS, fault_step=ONSET, hot_rank=1,
                       hot_bias=1.0),
    # DeepSpeed's AutoEPMoELayer (dropless, count exchange), through patch_all_to_all.
    "ds-healthy": Scenario(group="ds-healthy", steps=STEPS),
    "ds-slow": Scenario(group="ds-slow", steps=STEPS, fault_step=ONSET, slow_rank=1,
                        slow_factor=1.25, slow_mode="spin"),
    "ds-slow-sleep": Scenario(group="ds-slow-sleep", steps=STEPS, fault_step=ONSET,
                              slow_rank=1, slow_factor=1.25, slow_mode="sleep"),
    "ds-hot": Scenario(group="ds-hot", steps=STEPS, fault_step=ONSET, hot_rank=2,
                       hot_bias=1.0),
}  # fmt: skip

WORKERS = {"fs-": "tests.fairscale_worker", "ds-": "tests.deepspeed_worker"}


def worker_of(name: str) -> str:
    return WORKERS.get(name[:3], "tests.moe_worker")
WATCH_AFTER_HANG_S = 20.0


class AlertLog:
    """When each alert was first pending and first firing (a real Prometheus)."""

    def __init__(self, prometheus: Any) -> None:
        self.prometheus = prometheus
        self.first: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                alerts = self.prometheus.alerts()
            except OSError:
                continue
            for a in alerts:
                labels = a["labels"]
                name = labels["alertname"] + "".join(
                    f",{k}={labels[k]}" for k in ("rank", "cause") if k in labels
                )
                self.first.setdefault(f"{a['state']} {name}", time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def record(name: str, sc: Scenario, prometheus: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="epw-rec-") as tmp:
        stack = alerts = None
        with GlooCluster([sc], Path(tmp), record=True, worker=worker_of(name)) as cluster:
            if prometheus:
                from tests.promstack import PromStack

                stack = PromStack(Path(tmp) / "prom", [f"127.0.0.1:{cluster.metrics_port}"],
                                  for_duration=None).start()  # fmt: skip
                alerts = AlertLog(stack.prometheus)
            start = cluster.wait_for_event(f"START {sc.group}", 120)
            if sc.hang_rank is not None:
                hang = cluster.wait_for_event("HANG", 600)
                time.sleep(WATCH_AFTER_HANG_S)
            else:
                cluster.wait_for_event(f"DONE {sc.group}", 900)
                time.sleep(3)  # the last steps reach the collector
            if alerts is not None:
                alerts.stop()
            if stack is not None:
                stack.stop()
        files = cluster.recordings
        if len(files) != 1:
            raise SystemExit(f"{name}: expected one recording, got {files}")
        shutil.copy(files[0], OUT / f"{name}.parquet")
        log = [line for line in cluster.collector_log.splitlines() if "straggler" in line]
    seen = cluster.observed
    onset = cluster.events.get(f"ONSET {sc.group}")
    truth: dict[str, Any] = {"scenario": asdict(sc), "onset_step": cluster.onset_step.get(sc.group)}
    if sc.hang_rank is not None:
        truth["hang_s_after_start"] = hang - start
        onset = hang
    live = {
        f"{rank} {cause}": {
            "first_seen_s_after_onset": None if onset is None else seen.first_seen(key) - onset,
            "first_seen_s_after_start": seen.first_seen(key) - start,
            "episodes_in_scrapes": seen.episodes(key),
        }
        for key in seen.flags
        for (_, rank, cause) in [key]
    }
    meta = {
        "truth": truth,
        "live": live,
        "scrapes": len(seen.scrapes),
        "last_step": seen.last_step.get(sc.group),
        "collector_log": log,
    }
    if alerts is not None and onset is not None:
        meta["alerts_s_after_onset"] = {k: t - onset for k, t in alerts.first.items()}
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    ap.add_argument(
        "--prometheus",
        action="store_true",
        help="watch the slow-GPU run with a real Prometheus (shipped rules)",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        started = time.monotonic()
        print(f"recording {name} ...", flush=True)
        meta = record(name, SCENARIOS[name], args.prometheus and name == "moe-slow")
        size = (OUT / f"{name}.parquet").stat().st_size
        print(f"  {time.monotonic() - started:.0f} s, {size / 1e3:.0f} kB: "
              f"{json.dumps(meta['live'])} {json.dumps(meta.get('alerts_s_after_onset', {}))}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
