"""The Parquet recorder: what goes in comes out, files rotate, overload is counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from epwatch.collector.recorder import Recorder, RecorderConfig
from tests.helpers import make_records

pq = pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.timeout(60)


def test_round_trip_and_rotation_by_size(tmp_path: Path) -> None:
    dropped: list[int] = []
    cfg = RecorderConfig(
        str(tmp_path), max_file_bytes=1, row_group_records=1000, flush_seconds=0.01
    )
    rec = Recorder(cfg, dropped.append)
    rec.start()
    batches = [make_records(1000, 16, step0=i * 100) for i in range(5)]
    for i, batch in enumerate(batches):
        rec.put("g", f"n{i % 2}", 16, batch)
    rec.stop()
    files = sorted(tmp_path.glob("*.parquet"))
    assert len(files) >= 2 and not list(tmp_path.glob("*.partial"))
    table = pq.read_table(files)
    assert table.num_rows == 5000 and not dropped
    assert set(table.column("node").to_pylist()) == {"n0", "n1"}
    for name in ("step", "rank", "exit_ns"):
        got = np.sort(table.column(name).to_numpy())
        want = np.sort(np.concatenate([getattr(b, name) for b in batches]))
        np.testing.assert_array_equal(got, want)


def test_rotation_by_age(tmp_path: Path) -> None:
    cfg = RecorderConfig(str(tmp_path), max_file_seconds=0.0, row_group_records=1, flush_seconds=0)
    rec = Recorder(cfg, lambda n: None)
    rec.start()
    rec.put("g", "n", 16, make_records(10))
    rec.put("g", "n", 16, make_records(10))
    rec.stop()
    assert len(list(tmp_path.glob("*.parquet"))) == 2


def test_overload_is_counted_not_blocking(tmp_path: Path) -> None:
    dropped: list[int] = []
    rec = Recorder(RecorderConfig(str(tmp_path), queue_records=100), dropped.append)
    rec.put("g", "n", 16, make_records(80))  # not started: nothing drains the queue
    rec.put("g", "n", 16, make_records(80))
    assert dropped == [80]
    rec.start()
    rec.stop()
    assert pq.read_table(sorted(tmp_path.glob("*.parquet"))).num_rows == 80
