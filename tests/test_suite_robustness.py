"""`gradlab run` under stress: signals stop the suite, bad input is found before any training,
names resolve to bundled suites, and damaged run.json files give one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    TINY_SUITE,
    assert_same_run,
    interrupt_at,
    invoke,
    one_line_error,
    snapshot,
)

import gradlab.training
from gradlab.suites import SuiteError, _check_report_target, load_suite
from gradlab.training import TrainResult, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TINY_SUITE


@pytest.fixture
def suite_file(tmp_path) -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(TINY)
    return f


def _run(suite_file: Path, *extra):
    root = suite_file.parent
    return invoke("run", suite_file, "--runs", root / "runs", "--reports", root / "reports",
                  "-q", *extra)


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["status"]


# -- 1. a signal stops the whole suite ------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_stops_the_suite(sig, code, suite_file, monkeypatch) -> None:
    calls = []

    def interrupted(cfg, out, name, **kw):
        calls.append(name)
        return TrainResult(Path(out) / name, "interrupted", 3, {}, 0.1, None, int(sig))

    monkeypatch.setattr(gradlab.training, "train", interrupted)
    result = _run(suite_file)
    assert result.exit_code == code, result.output
    assert calls == ["resnet8-s0"], "the suite went on after an interrupted run"
    lines = result.stdout.splitlines()
    assert lines[:2] == ["training resnet8-s0", "interrupted resnet8-s0"]
    assert "stopped at resnet8-s0" in lines[2] and "at step 3" in lines[3]
    assert not (suite_file.parent / "reports").exists(), "a report was built"


def test_a_real_sigint_leaves_the_run_resumable_and_the_rerun_finishes_it(suite_file,
                                                                          monkeypatch) -> None:
    real_train = gradlab.training.train
    sigint = interrupt_at(3, signal.SIGINT)
    monkeypatch.setattr(gradlab.training, "train",
                        lambda *a, **kw: real_train(*a, on_model=sigint, **kw))
    result = _run(suite_file, "--no-report")
    assert result.exit_code == 130, result.output
    runs = suite_file.parent / "runs" / "tiny"
    assert _status(runs / "resnet8-s0") == "interrupted"
    assert not (runs / "plain8-s0").exists()

    monkeypatch.setattr(gradlab.training, "train", real_train)
    result = _run(suite_file, "--no-report")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ["resuming resnet8-s0", "training plain8-s0"]
    assert _status(runs / "resnet8-s0") == "completed"
    cfg = dict(load_suite(suite_file).configs())["resnet8-s0"]
    ref = train(cfg, suite_file.parent / "ref", "resnet8-s0", dashboard=False).run_dir
    assert_same_run(ref, runs / "resnet8-s0")


def test_sigint_to_a_gradlab_run_process(tmp_path) -> None:
    f = tmp_path / "long.toml"
    f.write_text(TINY.replace("steps = 6", "steps = 100000"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "gradlab", "run", str(f), "--runs",
                          str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"), "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = tmp_path / "runs" / "tiny" / "resnet8-s0"
    try:
        deadline = time.monotonic() + 90
        # The first checkpoint is written inside the training loop, where the handler is set.
        while not (run / "checkpoints" / "last.pt").exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the run never checkpointed"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert _status(run) == "interrupted"
    assert not (tmp_path / "runs" / "tiny" / "plain8-s0").exists()
    assert not (tmp_path / "reports").exists()


# -- 2. a folder does not hide a bundled suite ----------------------------------------------------
def test_a_folder_named_like_a_bundled_suite_does_not_hide_it(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "near-identity").mkdir()  # what `gradlab run near-identity --runs .` creates
    suite = load_suite("near-identity")
    assert suite.name == "near-identity" and Path(suite.source).name == "near-identity.toml"
    before = snapshot(tmp_path)
    # It resolves (the error is about the format), and nothing trains.
    one_line_error(invoke("run", "near-identity", "--runs", ".", "--format", "docx"),
                   "unknown format", "docx")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make, spec, words", [
    ("dir", "somewhere", ["unknown suite 'somewhere'", "near-identity"]),
    ("dir", "folder.toml", ["suite file", "folder.toml", "is not a file"]),
    (None, "nowhere.toml", ["suite file", "nowhere.toml", "not found"]),
])
def test_unknown_suites_are_one_line(make, spec, words, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if make:
        (tmp_path / spec).mkdir()
    before = snapshot(tmp_path)
    one_line_error(invoke("run", spec, "-q"), *words)
    assert snapshot(tmp_path) == before


def test_an_existing_file_without_toml_suffix_is_a_suite_file(tmp_path) -> None:
    f = tmp_path / "tiny-suite"
    f.write_text(TINY)
    assert load_suite(f).name == "tiny"


# -- 3. report options are checked before training ------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--format", "docx"], ["unknown format 'docx'", "html, pdf"]),
    (["--format", "html,docx"], ["unknown format 'docx'"]),
    (["--format", ","], ["--format", "no format"]),
    (["--format", ""], ["--format", "no format"]),
])
def test_bad_report_format_trains_nothing(extra, words, suite_file) -> None:
    before = snapshot(suite_file.parent)
    one_line_error(_run(suite_file, *extra), *words)
    assert snapshot(suite_file.parent) == before


def test_unwritable_reports_folder_trains_nothing(suite_file) -> None:
    blocker = suite_file.parent / "reports-file"
    blocker.write_text("not a folder")
    before = snapshot(suite_file.parent)
    root = suite_file.parent
    result = invoke("run", suite_file, "--runs", root / "runs", "--reports", blocker, "-q")
    one_line_error(result, "cannot write the report", "reports-file")
    assert snapshot(root) == before


def test_report_check_leaves_no_folder_behind(tmp_path) -> None:
    _check_report_target(("html",), tmp_path / "a" / "b" / "tiny")
    assert not list(tmp_path.iterdir())
    (tmp_path / "kept").mkdir()
    _check_report_target(("pdf",), tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


# -- 4. gradlab report with no format --------------------------------------------------------------
@pytest.mark.parametrize("fmt", [",", "", " , "])
def test_report_with_an_empty_format_list_is_one_line(fmt, tmp_path) -> None:
    one_line_error(invoke("report", tmp_path, "--out", tmp_path / "out", "--format", fmt),
                   "--format", "no format")
    assert not (tmp_path / "out").exists()


# -- damaged or conflicting run directories ------------------------------------------------------
@pytest.mark.parametrize("failure, action", [
    ("boom", "resuming"), (["x"], "resuming"), (None, "resuming"), ({"step": None}, "resuming"),
    ({"step": 3, "reason": "non-finite loss at step 3"}, "skipped"),
])
def test_a_failed_run_json_of_any_shape_is_handled(failure, action, tmp_path) -> None:
    f = tmp_path / "one.toml"
    f.write_text(TINY.replace('["resnet8", "plain8"]', '["resnet8"]'))
    runs = tmp_path / "runs"
    cfg = load_suite(f).configs()[0][1]
    train(cfg, runs / "tiny", "resnet8-s0", dashboard=False)
    run_json = runs / "tiny" / "resnet8-s0" / "run.json"
    info = json.loads(run_json.read_text())
    info.update(status="failed", failure=failure)
    run_json.write_text(json.dumps(info))
    result = invoke("run", f, "--runs", runs, "--no-report", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"{action} resnet8-s0"


def test_a_conflicting_later_run_is_found_before_training(suite_file) -> None:
    runs = suite_file.parent / "runs"
    cfg = dict(load_suite(suite_file).configs())["plain8-s0"].replace(steps=4)
    train(cfg, runs / "tiny", "plain8-s0", dashboard=False)
    before = snapshot(suite_file.parent)
    one_line_error(_run(suite_file), "another configuration", "plain8-s0")
    assert snapshot(suite_file.parent) == before, "resnet8-s0 was trained first"


def test_empty_leftover_folders_are_replaced(suite_file) -> None:
    run = suite_file.parent / "runs" / "tiny" / "resnet8-s0"
    (run / "metrics").mkdir(parents=True)  # killed before its run.json was written
    (run / "tb").mkdir()
    result = _run(suite_file, "--no-report")
    assert result.exit_code == 0, result.output
    assert _status(run) == "completed"


def test_a_folder_holding_files_is_refused_before_training(suite_file) -> None:
    other = suite_file.parent / "runs" / "tiny" / "plain8-s0"
    (other / "metrics").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    before = snapshot(suite_file.parent)
    one_line_error(_run(suite_file, "--no-report"), "plain8-s0", "not a gradlab run")
    assert snapshot(suite_file.parent) == before


# -- bad suite values that used to pass validation -----------------------------------------------
BAD = {
    "seed-negative": (TINY.replace("seeds = [0]", "seeds = [-1]"), ["seeds", "-1"]),
    "seed-huge": (TINY.replace("seeds = [0]", "seeds = [4294967296]"), ["seeds", "4294967296"]),
    "seed-twice": (TINY.replace("seeds = [0]", "seeds = [0, 1, 0]"),
                   ["seeds lists 0 more than once"]),
    "model-twice": (TINY.replace('"plain8"]', '"plain8", "resnet8"]'),
                    ["models lists resnet8 more than once"]),
    "epochs-nan": (TINY.replace("steps = 6\n", "epochs = nan\n"), ["epochs", "finite"]),
    "epochs-inf": (TINY.replace("steps = 6\n", "epochs = inf\n"), ["epochs", "finite"]),
    "lr-inf": (TINY + "lr = inf\n", ["[train] lr", "finite"]),
    "weight-decay-nan": (TINY + "weight_decay = nan\n", ["[train] weight_decay", "finite"]),
    "milestones-nan": (TINY + "milestones = [0.5, nan]\n", ["[train] milestones", "finite"]),
    "name-nul": (TINY.replace('name = "tiny"', 'name = "ti\\u0000ny"'),
                 ["plain directory name"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_one_line_and_change_nothing(case, tmp_path) -> None:
    text, words = BAD[case]
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(SuiteError):
        load_suite(f)
    before = snapshot(tmp_path)
    one_line_error(invoke("run", f, "--runs", tmp_path / "runs", "-q"), *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("after", [1, 2], ids=["between-runs", "before-the-report"])
def test_a_signal_between_runs_stops_the_suite_cleanly(after, suite_file, monkeypatch) -> None:
    """SIGTERM while no run trains (after run 1: the next run is not started; after the last:
    no report) stops the suite with exit 143 and a line saying where, and the same command
    then finishes the suite."""
    real_train = gradlab.training.train
    done = []

    def train_then_signal(*a, **kw):
        out = real_train(*a, **kw)
        done.append(out.run_dir.name)
        if len(done) == after:
            # Only with the suite's handler in place (else this would end the test process).
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(gradlab.training, "train", train_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    result = _run(suite_file)
    assert signal.getsignal(signal.SIGTERM) is before  # the suite's handler is gone again
    assert result.exit_code == 143, result.output
    runs = suite_file.parent / "runs" / "tiny"
    assert _status(runs / "resnet8-s0") == "completed"
    assert not (suite_file.parent / "reports").exists(), "a report was built"
    last = result.stdout.splitlines()[-1]
    if after == 1:
        assert done == ["resnet8-s0"] and not (runs / "plain8-s0").exists()
        assert last.startswith("interrupted: before ") and "plain8-s0 started" in last
    else:
        assert _status(runs / "plain8-s0") == "completed"
        assert last.startswith("interrupted: after the last run, before the report")

    monkeypatch.setattr(gradlab.training, "train", real_train)
    result = _run(suite_file)
    assert result.exit_code == 0, result.output
    assert (suite_file.parent / "reports" / "tiny").is_dir()
    assert _status(runs / "plain8-s0") == "completed"
