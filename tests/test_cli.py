"""The command line: `gradlab probe` end to end, `gradlab models`, help, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
from helpers import invoke, one_line_error, snapshot

from gradlab.cli import app
from gradlab.models import create_model, list_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    result = invoke("probe", "--model", "resnet20", "--dataset", "digits", "--steps", 12,
                    "--every", 5, "--batch-size", 16, "--seed", 0, "--device", "cpu",
                    "--out", out, "--name", "r20", "-q")
    assert result.exit_code == 0, result.output
    return out / "r20", result


# -- gradlab probe -----------------------------------------------------------------------------
def test_probe_prints_one_summary_line(probe_run) -> None:
    run, result = probe_run
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"completed: {run} (12 steps")
    assert "test_accuracy" in lines[0]
    assert not result.stderr


def test_probe_writes_the_metrics_table(probe_run) -> None:
    run, _ = probe_run
    df = pd.read_parquet(run / "metrics")
    assert list(df.columns) == ["step", "layer", "depth", "metric", "value"]
    assert sorted(df[df.metric == "loss"].step) == [0, 5, 10, 11]
    for step in (0, 5, 10, 11):
        at = df[df.step == step].metric.value_counts()
        assert at["residual_ratio"] == 9 and at["identity_gap"] == 7
        assert at["response_std"] == 20 and at["grad_norm"] == 39
    assert {"test_loss", "test_accuracy", "lr", "images_per_s", "accuracy"} <= set(df.metric)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["config"]["every"] == 5
    assert info["config"]["model"] == "resnet20" and info["config"]["steps"] == 12
    assert (run / "checkpoints" / "last.pt").is_file()


def test_probe_writes_tensorboard_scalars(probe_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = probe_run
    events = sorted((run / "tb").rglob("events.out.tfevents*"))
    assert events
    scalars: dict[str, dict[int, float]] = {}
    for e in events:
        acc = EventAccumulator(str(e), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({ev.step: ev.value for ev in acc.Scalars(tag)})
    for tag in ("loss", "accuracy", "lr", "test_loss", "residual_ratio/layer2.1",
                "residual_cosine/layer3.0", "identity_gap/layer1.2",
                "response_std/layer1.0.bn1", "response_grad_norm/fc", "grad_norm/conv1",
                "weight_norm/layer3.2.conv2"):
        assert tag in scalars, f"{tag} not among {sorted(scalars)[:8]}..."
    df = pd.read_parquet(run / "metrics")
    for metric, layer in (("loss", ""), ("residual_ratio", "layer2.1"),
                          ("response_std", "layer1.0.bn1")):
        want = df[(df.metric == metric) & (df.layer == layer)].set_index("step").value
        tag = f"{metric}/{layer}" if layer else metric
        assert sorted(scalars[tag]) == sorted(want.index) == [0, 5, 10, 11]
        for step, v in want.items():
            assert scalars[tag][step] == pytest.approx(v, rel=1e-6)  # float32 in the events


def test_gradlab_models_lists_names_and_parameter_counts() -> None:
    result = invoke("models")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    for name in list_models():
        n = sum(p.numel() for p in create_model(name).parameters())
        assert name in lines, name
        assert f"{n:,}" in lines[name], lines[name]
    assert "269,722" in lines["resnet20"] and "resnet110" in lines
    assert "6n+2" in result.stdout


def test_help_documents_every_option() -> None:
    top = invoke("--help")
    assert top.exit_code == 0 and "probe" in top.stdout and "models" in top.stdout
    result = invoke("probe", "--help")
    assert result.exit_code == 0
    command = typer.main.get_command(app).commands["probe"]
    options = [p for p in command.params if p.opts and p.opts[0].startswith("--")]
    assert len(options) >= 25
    text = " ".join(result.stdout.split())
    for p in options:
        for opt in p.opts:
            assert opt in result.stdout, f"{opt} missing from --help"
        assert p.help and len(p.help) > 10, f"{p.opts[0]} has no help text"
        assert " ".join(p.help.split())[:30] in text, p.opts[0]
    for needle in ("--model", "--dataset", "--data-dir", "--steps", "--epochs", "--batch-size",
                   "--lr", "--every", "--seed", "--device", "--out", "--name", "--resume",
                   "--force", "--shortcut"):
        assert needle in result.stdout


def test_no_arguments_prints_help() -> None:
    result = invoke()
    assert result.exit_code == 0 and "probe" in result.stdout


# -- bad input: one line on stderr, exit code 2, nothing changed -------------------------------
def _corrupt_checkpoint(run: Path) -> None:
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")


def _other_schema(run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    info["schema_version"] = 2
    (run / "run.json").write_text(json.dumps(info))


def _garbage_checkpoint(run: Path) -> None:
    (run / "checkpoints" / "last.pt").write_bytes(b"hello")


def _truncated_checkpoint(run: Path) -> None:
    p = run / "checkpoints" / "last.pt"
    p.write_bytes(p.read_bytes()[:1000])


BAD = {
    # id: (arguments, words the message must contain, how to damage the existing run first)
    "unknown-model": (["--model", "resnt20"], ["unknown model", "resnet20"], None),
    "unknown-family": (["--model", "vgg16"], ["unknown model", "gradlab models"], None),
    "resnet21": (["--model", "resnet21"], ["6n+2", "resnet20", "resnet26"], None),
    "plain2": (["--model", "plain2"], ["6n+2", "plain8"], None),
    "steps-0": (["--steps", "0"], ["--steps"], None),
    "steps-negative": (["--steps", "-3"], ["--steps"], None),
    "steps-not-a-number": (["--steps", "many"], ["--steps"], None),
    "every-larger-than-run": (["--steps", "5", "--every", "10"], ["--every", "5 steps"], None),
    "every-0": (["--every", "0"], ["--every"], None),
    "batch-size-0": (["--batch-size", "0"], ["--batch-size"], None),
    "lr-0": (["--lr", "0"], ["--lr"], None),
    "dataset-bogus": (["--dataset", "bogus"], ["--dataset", "bogus"], None),
    "shortcut-C": (["--shortcut", "C"], ["--shortcut"], None),
    "unknown-option": (["--colour", "red"], ["--colour"], None),
    "out-is-a-file": (["--out", "{out}/r20/run.json"], ["cannot create run directory"], None),
    "existing-run": (["--name", "r20"], ["already exists", "--resume", "--force"], None),
    "name-escapes-out": (["--name", "../evil"], ["--name"], None),
    "name-with-slash": (["--name", "a/b"], ["--name"], None),
    "resume-missing-run": (["--name", "nope", "--resume"], ["no such run directory"], None),
    "resume-corrupt-checkpoint": (["--name", "r20", "--resume"], ["last.pt", "checkpoint"],
                                  _corrupt_checkpoint),
    "resume-garbage-checkpoint": (["--name", "r20", "--resume"], ["last.pt", "checkpoint"],
                                  _garbage_checkpoint),
    "resume-truncated-checkpoint": (["--name", "r20", "--resume"], ["last.pt", "checkpoint"],
                                    _truncated_checkpoint),
    "resume-other-schema-version": (["--name", "r20", "--resume"], ["schema_version"],
                                    _other_schema),
    "existing-run-other-schema-version": (["--name", "r20"], ["already exists"], _other_schema),
}
if not torch.cuda.is_available():
    BAD["device-cuda-missing"] = (["--device", "cuda"], ["cuda", "--device"], None)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: str, probe_run,
                                                          tmp_path) -> None:
    args, words, damage = BAD[case]
    out = tmp_path / "out"
    shutil.copytree(probe_run[0], out / "r20")
    if damage:
        damage(out / "r20")
    before = snapshot(tmp_path, mtimes=True)
    result = invoke("probe", "--model", "resnet20", "--steps", 3, "--every", 1,
                    "--batch-size", 8, "--device", "cpu", "--no-tensorboard", "-q",
                    "--out", out, *(a.format(out=out) for a in args))
    one_line_error(result, *words)
    assert not result.stdout
    assert snapshot(tmp_path, mtimes=True) == before, "the command changed files"


def test_cifar10_missing_and_offline(probe_run, tmp_path, monkeypatch) -> None:
    def no_network(url, dest, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("gradlab.data.cifar10._fetch", no_network)
    out = tmp_path / "out"
    shutil.copytree(probe_run[0], out / "r20")
    data = tmp_path / "cifar"
    before = snapshot(out, mtimes=True)
    result = invoke("probe", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", data,
                    "--steps", 3, "--device", "cpu", "-q", "--out", out)
    line = one_line_error(result)
    assert "CIFAR-10" in line and str(data) in line
    assert snapshot(out, mtimes=True) == before
    assert not data.exists() or not list(data.iterdir())  # no half-downloaded leftovers


def test_python_dash_m_gradlab_exit_code_and_one_line(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "gradlab", "probe", "--model", "resnet21",
                        "--dataset", "digits", "--steps", "5", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("gradlab: error: resnet21") and not p.stdout
    assert not list(tmp_path.iterdir())


def test_non_finite_run_exits_1_with_one_line(tmp_path) -> None:
    result = invoke("probe", "--model", "resnet20", "--steps", 4, "--every", 2, "--lr", 1e30,
                    "--batch-size", 16, "--device", "cpu", "--no-tensorboard", "-q",
                    "--out", tmp_path, "--name", "nan")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: run failed: non-finite")
    assert json.loads((tmp_path / "nan" / "run.json").read_text())["status"] == "failed"


def test_a_rejected_choice_reads_as_one_plain_line() -> None:
    line = one_line_error(invoke("probe", "--model", "resnet8", "--device", "gpu"),
                          "--device", "'gpu' is not one of")
    assert "Value error" not in line
