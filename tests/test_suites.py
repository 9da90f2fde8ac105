"""Probe suites: validation of suite files, and `gradlab run` skipping, resuming and refusing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    TINY_SUITE,
    Interrupt,
    assert_same_run,
    checkpoint,
    interrupt_at,
    invoke,
    one_line_error,
    snapshot,
)

from gradlab.suites import SuiteError, bundled_suites, load_suite
from gradlab.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


GOOD = TINY_SUITE


def test_bundled_suites_load() -> None:
    suites = bundled_suites()
    assert {"near-identity", "he2015-cifar10"} <= set(suites)
    for name in suites:
        s = load_suite(name)
        assert s.name == name and s.configs()


def test_a_good_suite_expands_to_its_runs(tmp_path) -> None:
    f = tmp_path / "tiny.toml"
    f.write_text(GOOD)
    s = load_suite(f)
    names = [n for n, _ in s.configs()]
    assert names == ["resnet8-s0", "plain8-s0"]
    cfg = dict(s.configs())["plain8-s0"]
    assert (cfg.model, cfg.steps, cfg.every, cfg.batch_size, cfg.checkpoint_every) == (
        "plain8", 6, 2, 16, 2)


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD = {
    # id: (suite text, words the one-line message must contain)
    "unknown-key": (GOOD.replace("every = 2\n", "every = 2\ncolour = \"red\"\n"),
                    ["unknown key", "colour", "[train]"]),
    "training-option-at-top": (_replace("every = 2\n", "every = 2\nlr = 0.1\n"),
                               ["unknown key", "lr", "[train]"]),
    "missing-models": (_replace('models = ["resnet8", "plain8"]\n', ""),
                       ["missing required key", "models"]),
    "models-not-a-list": (_replace('["resnet8", "plain8"]', '"resnet8"'),
                          ["models must be a list"]),
    "models-empty": (_replace('["resnet8", "plain8"]', "[]"), ["models", "non-empty"]),
    "seeds-text": (_replace("seeds = [0]", 'seeds = ["0"]'), ["seeds", "integers"]),
    "seeds-bool": (_replace("seeds = [0]", "seeds = [true]"), ["seeds", "integers"]),
    "steps-text": (_replace("steps = 6", 'steps = "6"'), ["steps must be an integer"]),
    "steps-float": (_replace("steps = 6", "steps = 6.5"), ["steps must be an integer"]),
    "steps-bool": (_replace("steps = 6", "steps = true"), ["steps must be an integer"]),
    "steps-0": (_replace("steps = 6", "steps = 0"), ["--steps must be positive"]),
    "steps-negative": (_replace("steps = 6", "steps = -6"), ["--steps must be positive"]),
    "every-0": (_replace("every = 2", "every = 0"), ["--every must be positive"]),
    "every-larger-than-run": (_replace("every = 2", "every = 60"),
                              ["every = 60", "larger than the run", "6 steps"]),
    "unknown-model": (_replace('"plain8"', '"resnt8"'), ["unknown model", "resnt8"]),
    "depth-not-6n+2": (_replace('"plain8"', '"plain9"'), ["plain9", "6n+2", "plain8"]),
    "unknown-claim": (_replace('"degradation"', '"degredation"'),
                      ["unknown claim", "degredation", "degradation"]),
    "claim-not-text": (_replace('"degradation"', "3"), ["unknown claim", "3"]),
    "claims-not-a-list": (_replace('["degradation"]', '"degradation"'),
                          ["claims must be a list"]),
    "unknown-dataset": (_replace('dataset = "digits"', 'dataset = "imagenet"'),
                        ["unknown dataset", "imagenet", "digits"]),
    "name-escapes": (_replace('name = "tiny"', 'name = "../tiny"'),
                     ["name '../tiny'", "plain directory name"]),
    "name-not-text": (_replace('name = "tiny"', "name = 7"), ["name must be a string"]),
    "train-not-a-table": (GOOD.split("[train]")[0] + "train = 3\n", ["train must be a table"]),
    "train-unknown-key": (GOOD + "colour = 1\n", ["unknown [train] key 'colour'"]),
    "train-sets-a-run-field": (GOOD + "seed = 1\n", ["unknown [train] key 'seed'"]),
    "train-lr-text": (GOOD + 'lr = "fast"\n', ["[train] lr", "'fast'"]),
    "train-batch-size-float": (_replace("batch_size = 16", "batch_size = 2.5"),
                               ["[train] batch_size", "2.5"]),
    "train-augment-int": (GOOD + "augment = 1\n", ["[train] augment"]),
    "train-eval-every-text": (GOOD + 'eval_every = "x"\n', ["[train] eval_every",
                                                            "an integer"]),
    "train-checkpoint-every-float": (_replace("checkpoint_every = 2", "checkpoint_every = 2.5"),
                                     ["[train] checkpoint_every", "an integer"]),
    "train-milestones-text": (GOOD + 'milestones = [0.5, "x"]\n', ["[train] milestones"]),
    "train-milestones-range": (GOOD + "milestones = [0.5, 2.0]\n", ["milestones", "(0, 1)"]),
    "train-momentum-range": (GOOD + "momentum = 1.5\n", ["momentum", "[0, 1)"]),
    "train-nonfinite": (GOOD + 'nonfinite = "ignore"\n', ["--on-nonfinite", "'ignore'"]),
    "train-shortcut": (GOOD + 'shortcut = "C"\n', ["--shortcut", "'C'"]),
    "invalid-toml": (GOOD.replace("steps = 6", "steps = = 6"), ["invalid TOML", "line"]),
    "duplicate-key": (GOOD.replace("every = 2", "every = 2\nsteps = 3"), ["invalid TOML"]),
    "not-utf8": (b"\xff\xfe name", ["cannot read", "utf-8"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_suite_is_one_line_exit_2_and_changes_nothing(case: str, tmp_path) -> None:
    text, words = BAD[case]
    f = tmp_path / "bad.toml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SuiteError):
        load_suite(f)
    before = snapshot(tmp_path)
    result = invoke("run", f, "--runs", tmp_path / "runs", "--reports", tmp_path / "reports",
                    "-q")
    line = one_line_error(result, *words)
    assert not result.stdout
    if case != "every-larger-than-run":  # only the run names the 6 steps it has
        assert str(f) in line
    assert snapshot(tmp_path) == before, "the command changed files"


@pytest.mark.parametrize("spec, words", [
    ("no-such-suite", ["unknown suite 'no-such-suite'", "near-identity"]),
    ("missing.toml", ["suite file", "missing.toml", "not found"]),
])
def test_unknown_suite_is_one_line_exit_2(spec: str, words: list, tmp_path,
                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("run", spec, "--runs", tmp_path / "runs", "-q")
    line = one_line_error(result)
    for w in words:
        assert w in line
    assert not list(tmp_path.iterdir())


# -- gradlab run: skip completed, resume interrupted, refuse another configuration ----------------
def _suite_with_one_interrupted(tmp_path: Path, run: str) -> tuple[Path, Path, dict]:
    """The tiny suite's file, its runs folder and configs, with ``run`` stopped after its
    checkpoint at step 4 (an Interrupt at step 5)."""
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(GOOD)
    runs = tmp_path / "runs"
    configs = dict(load_suite(suite_file).configs())
    with pytest.raises(Interrupt):
        train(configs[run], runs / "tiny", run, dashboard=False, on_model=interrupt_at(5))
    return suite_file, runs, configs


def test_run_skips_completed_resumes_interrupted_and_refuses_other_configs(tmp_path) -> None:
    # resnet8-s0 was killed after its checkpoint at step 4: what SIGKILL leaves is a run.json
    # still saying "running" (the real kill is in tests/test_faults.py).
    suite_file, runs, configs = _suite_with_one_interrupted(tmp_path, "resnet8-s0")
    cut = runs / "tiny" / "resnet8-s0"
    info = json.loads((cut / "run.json").read_text())
    info.update(status="running", finished=None, failure=None)
    (cut / "run.json").write_text(json.dumps(info))

    result = invoke("run", suite_file, "--runs", runs, "--no-report", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["resuming resnet8-s0", "training plain8-s0"]
    assert lines[2].startswith("suite tiny: 1 trained, 1 resumed, 0 skipped, 0 failed")
    info = json.loads((cut / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_at"] == 4
    assert json.loads((runs / "tiny" / "plain8-s0" / "run.json").read_text())["status"] == \
        "completed"

    # the resumed run is the run that was never stopped
    ref = train(configs["resnet8-s0"], tmp_path / "ref", "resnet8-s0", dashboard=False).run_dir
    assert checkpoint(cut)["step"] == 6
    assert_same_run(ref, cut)

    # a second invocation trains nothing and touches nothing
    before = snapshot(runs)
    result = invoke("run", suite_file, "--runs", runs, "--no-report", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ["skipped resnet8-s0", "skipped plain8-s0"]
    assert "0 trained, 0 resumed, 2 skipped" in result.stdout
    assert snapshot(runs) == before

    # the same suite name with other settings is refused, not mixed into the runs
    suite_file.write_text(GOOD.replace("steps = 6", "steps = 8"))
    result = invoke("run", suite_file, "--runs", runs, "--no-report", "-q")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another configuration" in lines[0]
    assert "resnet8-s0" in lines[0] and "tiny" in lines[0]
    assert snapshot(runs) == before


def test_a_damaged_checkpoint_is_refused_before_any_run_trains(tmp_path) -> None:
    suite_file, runs, _ = _suite_with_one_interrupted(tmp_path, "plain8-s0")
    (runs / "tiny" / "plain8-s0" / "checkpoints" / "last.pt").write_bytes(b"junk")
    before = snapshot(runs)
    result = invoke("run", suite_file, "--runs", runs, "--no-report", "-q")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt or unreadable checkpoint" in lines[0]
    assert "training" not in result.stdout  # resnet8-s0 (planned first) was not started
    assert snapshot(runs) == before


def test_the_report_reads_only_the_suites_own_runs(tmp_path) -> None:
    # plain8/resnet8 x seeds 0, 1 first; then the suite lists only the plain nets: the residual
    # runs left in its folder must not feed the report.
    two = GOOD.replace("seeds = [0]", "seeds = [0, 1]").replace('claims = ["degradation"]',
                                                               'claims = ["near-identity"]')
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(two)
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    assert invoke("run", suite_file, "--runs", runs, "--reports", reports, "-q",
                  "--format", "html").exit_code == 0
    suite_file.write_text(two.replace('models = ["resnet8", "plain8"]', 'models = ["plain8"]'))
    result = invoke("run", suite_file, "--runs", runs, "--reports", reports, "-q",
                    "--format", "html")
    assert result.exit_code == 0, result.output
    html = (reports / "tiny" / "report.html").read_text()
    assert "resnet8-s0" not in html and "plain8-s1" in html


def test_a_suite_with_a_relative_data_dir_is_run_again(tmp_path, monkeypatch) -> None:
    # A run stores its data folder absolute; the suite still names it as written: the same.
    monkeypatch.chdir(tmp_path)
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(GOOD.replace('dataset = "digits"', 'dataset = "digits"\n'
                                       'data_dir = "data"'))
    assert invoke("run", suite_file, "--runs", "runs", "--no-report", "-q").exit_code == 0
    stored = json.loads((tmp_path / "runs" / "tiny" / "plain8-s0" / "run.json").read_text())
    assert stored["config"]["data_dir"] == str(tmp_path / "data")
    result = invoke("run", suite_file, "--runs", "runs", "--no-report", "-q")
    assert result.exit_code == 0, result.output
    assert "0 trained, 0 resumed, 2 skipped" in result.stdout
