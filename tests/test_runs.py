"""Run directories: whole Parquet parts, the long-table schema, run.json and load_run's errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import snapshot

import gradlab
from gradlab.runs import (
    METRICS_SCHEMA,
    SCHEMA_VERSION,
    MetricWriter,
    RunDir,
    RunError,
    find_runs,
    load_run,
    read_metrics,
    write_json_atomic,
)


def cols(layers, depths, metrics, values) -> dict[str, np.ndarray]:
    return {"layer": np.asarray(layers, dtype=object), "depth": np.asarray(depths, np.int32),
            "metric": np.asarray(metrics, dtype=object), "value": np.asarray(values, np.float64)}


STEP0 = cols(["conv1", "layer1.0", "layer1.0", ""], [0, 3, 3, -1],
             ["grad_norm", "residual_ratio", "identity_gap", "loss"], [1.5, 0.25, 0.75, 2.3])
STEP5 = cols(["conv1", ""], [0, -1], ["grad_norm", "loss"], [1.25, 1.9])


def make_run(path, parts=((0, STEP0), (5, STEP5)), **info) -> RunDir:
    rd = RunDir.create(path, {"config": {"model": "resnet20", "seed": 0}, **info})
    w = MetricWriter(rd.metrics_dir)
    for step, c in parts:
        w.add(step, c)
        w.flush()
    rd.mark("completed")
    return rd


# -- parts -------------------------------------------------------------------------------------
def test_parts_are_whole_and_leave_no_temporary_files(tmp_path) -> None:
    w = MetricWriter(tmp_path / "metrics")
    assert w.flush() is None  # nothing buffered, nothing written
    w.add(0, STEP0)
    w.add(5, STEP5)
    w.add(6, cols([], [], [], []))  # an empty step adds no rows
    assert w.rows_buffered == 6
    first = w.flush()
    w.add(10, STEP5)
    second = w.flush()
    assert [p.name for p in (first, second)] == ["part-000001.parquet", "part-000002.parquet"]
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == \
        ["part-000001.parquet", "part-000002.parquet"]
    for part in (first, second):
        assert pq.read_schema(part).remove_metadata() == METRICS_SCHEMA
    # a writer opened later continues the numbering instead of overwriting
    w2 = MetricWriter(tmp_path / "metrics")
    w2.add(20, STEP5)
    assert w2.flush().name == "part-000003.parquet"


def test_a_failed_write_leaves_no_visible_part(tmp_path, monkeypatch) -> None:
    w = MetricWriter(tmp_path / "metrics")
    w.add(0, STEP0)
    w.flush()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("gradlab.runs.os.replace", crash)
    w.add(5, STEP5)
    with pytest.raises(OSError):
        w.flush()
    monkeypatch.undo()
    visible = [p.name for p in (tmp_path / "metrics").iterdir() if not p.name.startswith(".")]
    assert visible == ["part-000001.parquet"]
    # readers see only the whole part
    df = pd.read_parquet(tmp_path / "metrics")
    assert sorted(df.step.unique()) == [0]


def test_pandas_reads_the_table_with_the_exact_schema(tmp_path) -> None:
    make_run(tmp_path / "r")
    df = pd.read_parquet(tmp_path / "r" / "metrics")
    assert list(df.columns) == ["step", "layer", "depth", "metric", "value"]
    assert df.step.dtype == np.int64
    assert df.depth.dtype == np.int32
    assert df.value.dtype == np.float64
    assert pd.api.types.is_string_dtype(df.layer) and pd.api.types.is_string_dtype(df.metric)
    assert len(df) == 6
    got = df.sort_values(["step", "layer", "metric"]).reset_index(drop=True)
    want = pd.DataFrame({
        "step": [0, 0, 0, 0, 5, 5], "layer": ["", "conv1", "layer1.0", "layer1.0", "", "conv1"],
        "depth": [-1, 0, 3, 3, -1, 0],
        "metric": ["loss", "grad_norm", "identity_gap", "residual_ratio", "loss", "grad_norm"],
        "value": [2.3, 1.5, 0.75, 0.25, 1.9, 1.25]})
    assert got.step.tolist() == want.step.tolist()
    assert got.layer.tolist() == want.layer.tolist()
    assert got.depth.tolist() == want.depth.tolist()
    assert got.metric.tolist() == want.metric.tolist()
    assert got.value.tolist() == want.value.tolist()


# -- run.json and load_run ---------------------------------------------------------------------
def test_run_json_and_load_run(tmp_path) -> None:
    make_run(tmp_path / "r", seed=7)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["schema_version"] == SCHEMA_VERSION == 1
    assert info["status"] == "completed" and info["finished"] and info["created"]
    assert info["name"] == "r" and info["seed"] == 7
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]
    run = gradlab.load_run(tmp_path / "r")
    assert run.config == {"model": "resnet20", "seed": 0}
    assert run.status == "completed" and run.name == "r"
    pd.testing.assert_frame_equal(
        run.metrics.sort_values(["step", "layer", "metric"]).reset_index(drop=True),
        pd.read_parquet(tmp_path / "r" / "metrics").sort_values(["step", "layer", "metric"])
        .reset_index(drop=True))
    only = load_run(tmp_path / "r", metrics=["loss"]).metrics
    assert set(only.metric) == {"loss"} and len(only) == 2
    assert find_runs([tmp_path]) == [tmp_path / "r"]
    assert find_runs([tmp_path / "r"]) == [tmp_path / "r"]


def test_run_without_parts_loads_an_empty_typed_table(tmp_path) -> None:
    make_run(tmp_path / "r", parts=())
    df = load_run(tmp_path / "r").metrics
    assert len(df) == 0 and list(df.columns) == METRICS_SCHEMA.names
    assert df.step.dtype == np.int64 and df.depth.dtype == np.int32


def test_status_values(tmp_path) -> None:
    rd = make_run(tmp_path / "r")
    for status in ("running", "failed", "interrupted", "completed"):
        rd.mark(status)
        assert load_run(tmp_path / "r").status == status
    with pytest.raises(ValueError):
        rd.mark("exploded")


def test_write_json_atomic_leaves_no_tmp(tmp_path) -> None:
    write_json_atomic(tmp_path / "x.json", {"a": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}


def test_rows_repeated_by_a_resumed_run_are_read_once(tmp_path) -> None:
    make_run(tmp_path / "r", parts=((0, STEP0), (5, STEP5),
                                    (5, cols(["conv1", ""], [0, -1], ["grad_norm", "loss"],
                                             [9.0, 8.0]))))
    df = read_metrics(tmp_path / "r")
    at5 = df[df.step == 5].set_index("metric").value
    assert len(df) == 6 and at5["loss"] == 8.0 and at5["grad_norm"] == 9.0  # the latest kept


def _message(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_load_run_missing_directory(tmp_path) -> None:
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "nope")
    assert "no such run directory" in _message(e)


def test_load_run_without_run_json(tmp_path) -> None:
    (tmp_path / "r" / "metrics").mkdir(parents=True)
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "r")
    assert "run.json" in _message(e)


def test_load_run_unreadable_run_json(tmp_path) -> None:
    make_run(tmp_path / "r")
    (tmp_path / "r" / "run.json").write_text('{"schema_version": 1, "config": ')
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "r")
    assert "run.json" in _message(e)
    (tmp_path / "r" / "run.json").write_text("[1, 2]")
    with pytest.raises(RunError):
        load_run(tmp_path / "r")


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_load_run_other_schema_version(tmp_path, version) -> None:
    make_run(tmp_path / "r")
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    info["schema_version"] = version
    (tmp_path / "r" / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "r")
    assert "schema_version" in _message(e) and repr(version) in str(e.value)


def test_load_run_truncated_part_names_the_part(tmp_path) -> None:
    make_run(tmp_path / "r")
    part = tmp_path / "r" / "metrics" / "part-000002.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "r")
    assert "part-000002.parquet" in _message(e)
    assert "part-000001" not in str(e.value)


def test_load_run_part_with_garbage(tmp_path) -> None:
    make_run(tmp_path / "r")
    (tmp_path / "r" / "metrics" / "part-000001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "r")
    assert "part-000001.parquet" in _message(e)


def test_create_refuses_an_existing_run_unless_forced(tmp_path) -> None:
    make_run(tmp_path / "r")
    before = snapshot(tmp_path)
    with pytest.raises(RunError) as e:
        RunDir.create(tmp_path / "r", {})
    assert "--resume" in _message(e) and "--force" in str(e.value)
    assert snapshot(tmp_path) == before
    rd = RunDir.create(tmp_path / "r", {"config": {}}, force=True)
    assert not list(rd.metrics_dir.iterdir())
    assert load_run(tmp_path / "r").status == "running"


def test_force_never_deletes_a_folder_that_is_not_a_run(tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunError) as e:
        RunDir.create(tmp_path / "mine", {}, force=True)
    assert "not a gradlab run" in _message(e)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_parts_from_the_writer_keep_types_of_unusual_values(tmp_path) -> None:
    w = MetricWriter(tmp_path / "m")
    w.add(2**40, cols(["a", ""], [2**31 - 1, -1], ["x", "y"], [np.nan, -np.inf]))
    w.flush()
    t = pq.read_table(tmp_path / "m")
    assert t.schema.field("step").type == pa.int64()
    df = t.to_pandas()
    assert df.step.tolist() == [2**40] * 2 and df.depth.tolist() == [2**31 - 1, -1]
    assert np.isnan(df.value[0]) and df.value[1] == -np.inf


def test_run_json_is_strict_json(tmp_path) -> None:
    """NaN and inf (a final test loss of a diverged run) are written as null: other JSON
    parsers reject Python's bare NaN."""
    from gradlab.runs import write_json_atomic

    path = tmp_path / "run.json"
    write_json_atomic(path, {"final": {"test_loss": float("nan"), "loss": 0.5,
                                       "x": [float("inf"), 1.0]}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"final": {"test_loss": None, "loss": 0.5, "x": [None, 1.0]}}


def test_a_part_of_another_column_type_is_a_run_error_naming_it(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradlab.runs import MetricWriter, RunError

    run = tmp_path / "r"
    (run / "metrics").mkdir(parents=True)
    w = MetricWriter(run / "metrics")
    w.add(0, {"layer": np.array(["", "a"], dtype=object), "depth": np.array([-1, 0], np.int32),
              "metric": np.array(["loss", "x"], dtype=object), "value": np.array([1.0, 2.0])})
    part = w.flush()
    from gradlab.runs import read_metrics

    assert len(read_metrics(run)) == 2
    t = pq.read_table(part)
    pq.write_table(t.set_column(4, "value", t["value"].cast(pa.float32())), part)
    with pytest.raises(RunError, match=r"part-\d+.parquet: not a gradlab metrics part "
                                       r"\(column 'value' is float, the schema says double\)"):
        read_metrics(run)
