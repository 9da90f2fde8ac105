"""Loading run directories for a report: grouping, tail means, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import make_run

from gradlab.report import ReportError, load_runs
from gradlab.report.load import REPORT_METRICS


def test_loads_and_identifies_runs(supported_suite: Path) -> None:
    rs = load_runs([supported_suite])
    assert rs.skipped == []
    assert len(rs.runs) == 12
    assert rs.datasets == ["digits"]
    models = rs.models()
    assert sorted(m for _, m in models) == ["plain20", "plain56", "resnet20", "resnet56"]
    assert all([r.seed for r in runs] == [0, 1, 2] for runs in models.values())
    r = next(r for r in rs.runs if r.model == "resnet56")
    assert (r.family, r.depth, r.residual, r.variant) == ("resnet", 56, True, "A")
    assert set(r.tables) <= set(REPORT_METRICS)  # only what the report needs is read
    assert r.logged_steps == 60


def test_final_values_are_tail_means(supported_suite: Path) -> None:
    r = load_runs([supported_suite / "plain20-s0"]).runs[0]
    loss = r.scalar("loss")
    # 60 logged steps after step 0: the last 10% is the last 6.
    assert r.final_scalar("loss") == pytest.approx(loss.iloc[-6:].mean())
    tail = r.tail_steps("response_std")
    assert list(tail) == list(range(550, 601, 10))
    fl = r.final_layers("response_std")
    t = r.metric("response_std")
    ref = t[(t["layer"] == "layer1.0.bn1") & t["step"].isin(tail)]["value"].mean()
    assert fl.set_index("layer").loc["layer1.0.bn1", "value"] == pytest.approx(ref)
    assert list(fl["depth"]) == sorted(fl["depth"])  # forward order


def test_empty_directory_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no gradlab runs"):
        load_runs([tmp_path])
    with pytest.raises(ReportError, match="no such directory"):
        load_runs([tmp_path / "missing"])
    with pytest.raises(ReportError):
        load_runs([])


def test_run_without_metrics_is_skipped_with_reason(tmp_path: Path) -> None:
    make_run(tmp_path, "plain20", 0)
    bare = make_run(tmp_path, "plain20", 1)
    for part in (bare / "metrics").glob("*.parquet"):
        part.unlink()
    rs = load_runs([tmp_path])
    assert [r.name for r in rs.runs] == ["plain20-s0"]
    assert rs.skipped == [(str(bare.resolve()), "no metrics (no Parquet parts under metrics/)")]


def test_truncated_parquet_part_skips_the_run_naming_the_file(tmp_path: Path) -> None:
    # Decision: the whole run is skipped (its last steps, which claims use, may be missing).
    make_run(tmp_path, "plain20", 0)
    bad = make_run(tmp_path, "plain20", 1)
    part = next((bad / "metrics").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    rs = load_runs([tmp_path])
    assert len(rs.runs) == 1
    (path, reason), = rs.skipped
    assert path == str(bad.resolve())
    assert "part-000001.parquet" in reason and "unreadable" in reason


def test_all_runs_unusable_is_a_report_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, "plain20", 0)
    (run / "run.json").write_text("{not json")
    with pytest.raises(ReportError,
                       match=r"no usable runs: 1 skipped \(plain20-s0: run.json: unreadable"):
        load_runs([tmp_path])


def test_duplicate_runs_are_counted_once(tmp_path: Path) -> None:
    make_run(tmp_path, "resnet20", 0)
    dup = make_run(tmp_path, "resnet20", 0, dirname="resnet20-s0-again", status="failed")
    rs = load_runs([tmp_path])
    assert [r.path.name for r in rs.runs] == ["resnet20-s0"]  # the completed one is kept
    (path, reason), = rs.skipped
    assert path == str(dup.resolve()) and reason.startswith("duplicate of resnet20-s0")


def test_unknown_model_is_skipped(tmp_path: Path) -> None:
    make_run(tmp_path, "plain20", 0)
    odd = make_run(tmp_path, "plain20", 1)
    info = json.loads((odd / "run.json").read_text())
    info["model"] = {}
    info["config"]["model"] = "mystery"
    (odd / "run.json").write_text(json.dumps(info))
    rs = load_runs([tmp_path])
    assert "cannot tell the model's family and depth" in rs.skipped[0][1]


def test_mixed_datasets_are_kept_apart(tmp_path: Path) -> None:
    make_run(tmp_path, "plain20", 0)
    make_run(tmp_path, "plain20", 0, dataset="cifar10")  # same model and seed: not a duplicate
    rs = load_runs([tmp_path])
    assert rs.skipped == []
    assert {d: [r.name for r in runs] for d, runs in rs.by_dataset().items()} == {
        "cifar10": ["plain20-s0-cifar10"], "digits": ["plain20-s0"]}


def test_only_requested_metrics_are_read(tmp_path: Path) -> None:
    run = make_run(tmp_path, "resnet20", 0)
    rs = load_runs([run], metrics=["loss"])
    r = rs.runs[0]
    assert list(r.tables) == ["loss"]
    assert isinstance(r.metric("response_std"), pd.DataFrame) and r.metric("response_std").empty
    assert np.isfinite(r.final_scalar("loss"))
