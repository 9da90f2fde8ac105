"""Runs that survive faults and bad input, and lose nothing.

* Real ``gradlab probe`` subprocesses killed with SIGKILL, SIGTERM and SIGINT mid-run: the run
  directory stays readable, and ``--resume`` ends with the weights and the metrics table of a run
  that was never stopped.
* A non-finite gradient (or response) injected at a known layer and step: the run stops there,
  names that layer, keeps every row up to it, and the report shows why; ``skip`` skips the step.
* Bad input the user can give (files, folders, options): one stderr line, exit code 2, nothing on
  disk changed. Cases already in tests/test_cli.py (unknown model, 6n+2 depth, --steps <= 0,
  --every larger than the run, a file as --out, corrupt/truncated checkpoint, other
  schema_version on --resume, existing run, --name escaping --out, missing CIFAR offline) are not
  repeated here; suite files are in tests/test_suites.py.
* Safe loading: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_same_run, checkpoint, invoke, one_line_error, snapshot, table

from gradlab.config import TrainConfig
from gradlab.runs import load_run
from gradlab.training import NonFiniteError, train

pytestmark = pytest.mark.usefixtures("one_thread")


# -- killed mid-run: SIGKILL, SIGTERM, SIGINT ----------------------------------------------------
# 60 steps, a checkpoint every 10: the signal lands between checkpoints, with rows buffered.
STEPS, CKPT_EVERY = 60, 10
PROBE = ["probe", "--model", "resnet20", "--dataset", "digits", "--steps", STEPS, "--every", 2,
         "--checkpoint-every", CKPT_EVERY, "--batch-size", 32, "--seed", 3, "--device", "cpu",
         "-q"]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = invoke(*PROBE, "--no-tensorboard", "--out", out, "--name", "r")
    assert result.exit_code == 0, result.output
    return out / "r"


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> dict[str, dict]:
    """Three real `gradlab probe` processes, run side by side, each sent its signal mid-run.

    Each is signalled 0.3 s after its second part (the checkpoint at step 20) appears, so the
    signal lands well inside the run, after a checkpoint, with rows buffered since.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {}
    for name in SIGNALS:
        out = tmp_path_factory.mktemp(name.lower())
        cmd = [sys.executable, "-m", "gradlab", *map(str, PROBE), "--out", str(out), "--name",
               "r"]
        if name != "SIGKILL":  # the killed one also has TensorBoard files open
            cmd.append("--no-tensorboard")
        procs[name] = {"run": out / "r", "proc": subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    deadline = time.monotonic() + 240
    pending = dict(procs)
    while pending:
        assert time.monotonic() < deadline, "the runs never reached their second checkpoint"
        for name, p in list(pending.items()):
            proc = p["proc"]
            assert proc.poll() is None, (name, proc.communicate())
            parts = list((p["run"] / "metrics").glob("part-*.parquet"))
            if "ready" not in p and len(parts) >= 2:
                p["ready"] = time.monotonic()
            if "ready" in p and time.monotonic() - p["ready"] > 0.3:
                assert (p["run"] / "checkpoints" / "last.pt").exists()
                proc.send_signal(SIGNALS[name])
                del pending[name]
        time.sleep(0.005)
    for p in procs.values():
        p["stdout"], p["stderr"] = p["proc"].communicate(timeout=120)
        p["returncode"] = p["proc"].returncode
        # What the directory held right after the process ended, before any resume.
        p["info"] = json.loads((p["run"] / "run.json").read_text())
        p["loaded"] = load_run(p["run"])
        p["checkpoint_step"] = checkpoint(p["run"])["step"]
    return procs


def test_sigkill_leaves_a_readable_run_that_resumes_exactly(signalled, uninterrupted,
                                                            tmp_path) -> None:
    p = signalled["SIGKILL"]
    run = p["run"]
    assert p["returncode"] == -signal.SIGKILL
    assert p["info"]["status"] == "running" and p["info"]["finished"] is None
    loaded = p["loaded"]
    assert loaded.status == "running"
    # Every part on disk is whole; what was buffered since the last flush is simply not there.
    loss = sorted(loaded.metrics[loaded.metrics.metric == "loss"].step)
    assert loss[0] == 0 and loss == list(range(0, loss[-1] + 1, 2))
    assert 18 <= loss[-1] < STEPS - 1
    assert p["checkpoint_step"] in (10, 20, 30, 40, 50)
    ref = table(uninterrupted)
    on_disk = table(run)
    assert set(on_disk.step) <= set(ref.step)
    pd.testing.assert_frame_equal(on_disk, ref[ref.step.isin(set(on_disk.step))]
                                  .reset_index(drop=True))

    # `gradlab report` reads it, and lists it as still running.
    result = invoke("report", run, "--out", tmp_path / "report", "--format", "html")
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<tr><td>r</td><td>running</td>" in html  # among the runs that did not complete

    result = invoke("probe", "--resume", "--out", run.parent, "--name", "r", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("completed:")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_at"] == p["checkpoint_step"]
    assert_same_run(uninterrupted, run)
    # rows written after the checkpoint were set aside, not deleted
    assert all(f.suffix == ".parquet" for f in (run / "metrics" / ".superseded").glob("*"))


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_flush_mark_interrupted_and_resume_exactly(name, signalled,
                                                                     uninterrupted) -> None:
    p = signalled[name]
    run = p["run"]
    # The shell's convention, 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT.
    assert p["returncode"] == 128 + getattr(signal, name), (p["returncode"], p["stderr"])
    assert p["stdout"].startswith(f"interrupted: {run}") and "Traceback" not in p["stderr"]
    info = p["info"]
    assert info["status"] == "interrupted" and info["finished"] and info["failure"] is None
    # The loop stopped between two steps, flushed every buffered row and checkpointed that point.
    stop = p["checkpoint_step"]
    assert 20 < stop < STEPS, "the signal did not land between checkpoints"
    loaded = p["loaded"]
    assert loaded.status == "interrupted"
    assert sorted(loaded.metrics[loaded.metrics.metric == "loss"].step) == list(range(0, stop, 2))
    assert not list((run / "checkpoints").glob(".*.tmp"))

    result = invoke("probe", "--resume", "--out", run.parent, "--name", "r", "-q",
                    "--no-tensorboard")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_at"] == stop
    assert not (run / "metrics" / ".superseded").exists(), "nothing had to be set aside"
    assert_same_run(uninterrupted, run)


# -- non-finite gradients and responses -----------------------------------------------------------
NF = TrainConfig(model="resnet20", dataset="digits", steps=12, every=2, batch_size=16,
                 checkpoint_every=4, eval_every=4, seed=0, device="cpu")
LAYER = "layer2.1.conv1"


def inject_inf(step: int, where: str):
    """An on_model callback that writes inf into ``layer2.1.conv1``'s weight gradient (or its
    output) on training step ``step``, and on any re-measurement of that same batch."""

    def on_model(model):
        state: dict = {"n": 0, "batch": None, "hit": False}

        def pre(mod, args):
            if mod.training and torch.is_grad_enabled():
                if state["n"] == step:
                    state["batch"] = args[0]
                state["hit"] = args[0] is state["batch"]
                state["n"] += 1

        model.register_forward_pre_hook(pre)
        conv = model.get_submodule(LAYER)
        if where == "gradient":
            conv.weight.register_hook(
                lambda g: torch.full_like(g, float("inf")) if state["hit"] else g)
        else:
            conv.register_forward_hook(
                lambda mod, args, out: out * float("inf") if state["hit"] and mod.training
                else out)

    return on_model


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    return train(NF.replace(seed=1), tmp_path_factory.mktemp("good"), "good",
                 dashboard=False).run_dir


# The layer named is the code's "first": the earliest non-finite response in forward order (an
# inf conv output shows first in the BN right after it, the first probed response), else the
# deepest non-finite gradient (backward runs from the last layer to the first).
@pytest.mark.parametrize("where, layer, what", [
    ("gradient", LAYER, "gradient"),
    ("output", "layer2.1.bn1", "loss"),
])
def test_non_finite_stops_at_the_step_and_names_the_layer(where, layer, what, tmp_path,
                                                         good_run) -> None:
    with pytest.raises(NonFiniteError) as e:
        train(NF, tmp_path, "bad", dashboard=False, on_model=inject_inf(7, where))
    reason = f"non-finite {what} at step 7, first at layer {layer}"
    assert str(e.value) == reason
    run = tmp_path / "bad"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed"
    assert info["failure"] == {"reason": reason, "step": 7, "layer": layer}
    # Every row up to the failure is kept, the failing step's measurements included; nothing
    # of the bad step reached the weights (the last checkpoint is before it).
    df = load_run(run).metrics
    assert df.step.max() == 7
    assert sorted(df[df.metric == "loss"].step) == [0, 2, 4, 6, 7]
    at7 = df[df.step == 7]
    bad = at7[~np.isfinite(at7.value)]
    assert layer in set(bad.layer)
    assert checkpoint(run)["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint(run)["model"].values())
    if where != "gradient":
        return  # the report is drawn once: it reads run.json, not how the run failed

    out = tmp_path / "report"
    from gradlab.report import build_report

    rep = build_report([run, good_run], out, formats=("html",))
    assert [r.name for r in rep.runs if r.status == "failed"] == ["bad"]
    html = (out / "report.html").read_text()
    assert (f"<tr><td>bad</td><td>failed</td><td>{reason}</td><td>7</td><td>{layer}</td></tr>"
            in html)
    assert "<td>good</td>" in html


@pytest.mark.parametrize("step", [7, 11], ids=["mid-run", "last-step"])
def test_non_finite_step_is_skipped_on_request(step: int, tmp_path) -> None:
    result = train(NF.replace(nonfinite="skip"), tmp_path, "skip", dashboard=False,
                   on_model=inject_inf(step, "gradient"))
    assert result.status == "completed" and result.failure is None
    run = tmp_path / "skip"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["skipped_steps"] == [step]
    ck = checkpoint(run)
    assert ck["step"] == NF.steps  # a skipped last step still ends with the final checkpoint
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    df = load_run(run).metrics
    loss = df[df.metric == "loss"]
    assert np.isfinite(loss.value).all()
    assert sorted(set(loss.step)) == sorted({0, 2, 4, 6, 8, 10, 11, step})
    test_loss = df[df.metric == "test_loss"]
    assert NF.steps in set(test_loss.step) and np.isfinite(test_loss.value).all()


DEPTHS = {"conv1": 0, "bn1": 1, "layer1.0": 2, "layer1.0.conv1": 3, "layer1.0.bn1": 4,
          "layer1.0.conv2": 5, "layer1.0.bn2": 6, "layer1.1": 7, "layer1.1.conv1": 8,
          "layer1.1.bn1": 9, "fc": 10}


@pytest.mark.parametrize("bad, first", [
    # a block's output exists only after its own layers': its last BN is first
    ({("layer1.0", "residual_ratio"), ("layer1.0.bn2", "response_std"),
      ("layer1.1.bn1", "response_std"), ("fc", "response_std")}, "layer1.0.bn2"),
    # the addition itself went bad (its layers did not): the block, not the next block's BN
    ({("layer1.0", "identity_gap"), ("layer1.1.bn1", "response_std")}, "layer1.0"),
    ({("bn1", "response_std"), ("layer1.0", "residual_ratio")}, "bn1"),
    # outputs all finite: the deepest non-finite gradient, where backward met it first
    ({("conv1", "grad_norm"), ("layer1.0.conv2", "grad_norm"),
      ("layer1.0.bn1", "response_grad_norm")}, "layer1.0.conv2"),
    ({("", "loss")}, None),
])
def test_which_layer_is_first(bad: set, first: str | None) -> None:
    from gradlab.training import _first_nonfinite

    rows = [(layer, d, m) for layer, d in DEPTHS.items()
            for m in ("response_std", "grad_norm", "response_grad_norm")]
    rows += [(b, DEPTHS[b], m) for b in ("layer1.0", "layer1.1")
             for m in ("residual_ratio", "identity_gap")]
    rows += [("", -1, "loss")]
    cols = {"layer": np.array([r[0] for r in rows], dtype=object),
            "depth": np.array([r[1] for r in rows], dtype=np.int32),
            "metric": np.array([r[2] for r in rows], dtype=object),
            "value": np.array([np.inf if (r[0], r[2]) in bad else 1.0 for r in rows])}
    assert _first_nonfinite(cols) == first


def _grads(dtype: torch.dtype, bad: float | None, where: int, layout: str) -> list[torch.Tensor]:
    """Parameters of three shapes with gradients; ``bad`` written into gradient ``where``."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((8, 4, 3, 3), (33,), (5, 7))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e3
    if layout == "transposed":  # not one dense block: the foreach path takes it
        params[2].grad = torch.randn(7, 5).to(dtype).T
    elif layout == "mixed":  # two dtypes: the foreach path too
        params[1] = torch.nn.Parameter(params[1].detach().double())
        params[1].grad = torch.randn_like(params[1])
    elif layout == "missing":  # a parameter without a gradient is skipped
        params.append(torch.nn.Parameter(torch.randn(4).to(dtype)))
    if bad is not None:
        g = params[where].grad
        if bad > 1e17:  # every element large
            g.fill_(bad)
        else:
            g[(-1,) * g.ndim] = bad
    return params


@pytest.mark.parametrize("layout", ["dense", "transposed", "mixed", "missing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bad,where,loss", [
    (None, 0, 1.0), (float("inf"), 0, 1.0), (float("-inf"), 2, 1.0), (float("nan"), 1, 1.0),
    # every element large: squares past float32's range, a sum of finite squares past it
    # (288 x 1.44e36 = 4.1e38), and one just within it (2.9e38)
    (3.0e38, 0, 1.0), (1.2e18, 0, 1.0), (1.0e18, 0, 1.0),
    (None, 0, float("inf")), (None, 0, float("nan")), (float("inf"), 0, float("-inf")),
])
def test_unlogged_step_check_finds_exactly_the_non_finite(dtype, bad, where, loss,
                                                          layout) -> None:
    from gradlab.probing.fused import kernels as _kernels
    from gradlab.training import _bad_values, nonfinite, nonfinite_flag

    params = _grads(dtype, bad, where, layout)
    # Reference in float64: inf/NaN anywhere, or a squared norm beyond float32's range.
    limit = torch.finfo(torch.float32).max
    ref = not (np.isfinite(loss) and all(float(p.grad.double().square().sum()) <= limit
                                         for p in params if p.grad is not None))
    assert ref is (bad is not None and bad != 1.0e18 or not np.isfinite(loss))
    if layout == "dense":  # the kernels' path, not the fallback
        assert _kernels.load(required=True)
        assert _kernels.sq_list([p.grad for p in params]) is not None
    assert nonfinite(torch.tensor(loss), params) is ref
    # The device-side form (the GPU's unlogged steps, and the fallback above) says the same.
    assert bool(nonfinite_flag(torch.tensor(loss), params)) is ref
    # A logged step applies the same rule to its rows (float32 grad_norm, as the probe logs).
    rows = [p.grad.double().square().sum().sqrt().float() for p in params if p.grad is not None]
    cols = {"value": np.array([float(loss), *map(float, rows)]),
            "metric": np.array(["loss"] + ["grad_norm"] * len(rows), dtype=object)}
    assert bool(_bad_values(cols).any()) is ref


@pytest.mark.parametrize("scale, want", [(1.0e17, False), (1.2e18, True)])
def test_float64_gradients_follow_the_same_rule(scale: float, want: bool) -> None:
    """A float64 gradient's norm of 2e19 is finite in float64 but its square is past float32's
    range: non-finite by the rule, on the host check and the device-side one alike."""
    from gradlab.training import nonfinite, nonfinite_flag

    p = torch.nn.Parameter(torch.zeros(288, dtype=torch.float64))
    p.grad = torch.full_like(p, scale)  # sum of squares 288 x scale^2: 2.9e36 or 4.1e38
    assert nonfinite(torch.tensor(1.0), [p]) is want
    assert bool(nonfinite_flag(torch.tensor(1.0), [p])) is want


# -- bad input: one line on stderr, exit code 2, nothing changed --------------------------------
def _pickle_batch(n: int = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, protocol=2)


def write_fake_cifar(root: Path) -> Path:
    """A tiny but well-formed cifar-10-batches-py (8 images per batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, f in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        (folder / f).write_bytes(_pickle_batch(seed=i))
    names = b"airplane automobile bird cat deer dog frog horse ship truck".split()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return folder


class _Touch:
    """Unpickling this creates a file: what a malicious file would do (something worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cifar_truncated(folder: Path) -> None:
    f = folder / "data_batch_3"
    f.write_bytes(f.read_bytes()[:500])


def _cifar_wrong_file(folder: Path) -> None:
    # Another file under the right name: the meta file where a batch belongs.
    shutil.copy(folder / "batches.meta", folder / "data_batch_3")


def _cifar_wrong_shape(folder: Path) -> None:
    (folder / "data_batch_3").write_bytes(pickle.dumps(
        {b"data": np.zeros((8, 1024), np.uint8), b"labels": [0] * 8}, protocol=2))


def _cifar_code(folder: Path) -> None:
    (folder / "data_batch_3").write_bytes(pickle.dumps(
        {b"data": _Touch(folder.parent.parent / "pwned"), b"labels": []}, protocol=2))


def _cifar_missing_file(folder: Path) -> None:
    (folder / "data_batch_3").unlink()


def _no_network(url, dest, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


PROBE_BAD = {
    # id: (probe arguments, words the message must contain, set-up under tmp)
    "cifar-truncated-batch": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                              ["data_batch_3"], _cifar_truncated),
    "cifar-wrong-file": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                         ["data_batch_3"], _cifar_wrong_file),
    "cifar-wrong-shape": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                          ["data_batch_3", "shape"], _cifar_wrong_shape),
    "cifar-batch-runs-code": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                              ["data_batch_3", "refused"], _cifar_code),
    "cifar-missing-file-offline": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                                   ["CIFAR-10", "cifar"], _cifar_missing_file),
    "data-dir-missing-offline": (["--dataset", "cifar10", "--data-dir", "{tmp}/nope"],
                                 ["CIFAR-10", "nope"], None),
    "data-dir-is-a-file": (["--dataset", "cifar10", "--data-dir", "{tmp}/out/r20/run.json"],
                           ["run.json"], None),
    "out-under-a-file": (["--out", "{tmp}/notes.txt/runs"], ["cannot create run directory",
                                                            "notes.txt"], None),
    "resume-checkpoint-that-runs-code": (["--name", "r20", "--resume"],
                                         ["last.pt", "unsafe checkpoint", "weights-only"],
                                         "malicious-checkpoint"),
    "resume-other-schema-version-0": (["--name", "r20", "--resume"], ["schema_version 0"],
                                      "schema-0"),
    "resume-run-json-garbage": (["--name", "r20", "--resume"], ["run.json"], "run-json-garbage"),
    "force-on-a-folder-that-is-not-a-run": (["--name", "notarun", "--force"],
                                            ["not a gradlab run directory"], None),
    "epochs-0": (["--epochs", "0"], ["--epochs"], None),
    # Checked before the run directory is made, or (--force) the old one replaced.
    "force-batch-larger-than-the-data": (["--name", "r20", "--force", "--batch-size", "5000"],
                                         ["batch size 5000", "training samples"], None),
    "batch-larger-than-the-data": (["--name", "new", "--batch-size", "5000"],
                                   ["batch size 5000"], None),
    # Damaged run directories on --resume (RUN_DAMAGE below).
    "resume-run-json-not-utf8": (["--name", "r20", "--resume"], ["run.json", "unreadable"],
                                 None),
    "resume-config-steps-a-string": (["--name", "r20", "--resume"],
                                     ["run.json", "config cannot be resumed"], None),
    "resume-config-milestones-not-a-list": (["--name", "r20", "--resume"],
                                            ["run.json", "config cannot be resumed"], None),
    "resume-skipped-steps-not-a-list": (["--name", "r20", "--resume"],
                                        ["run.json", "skipped_steps"], None),
    "resume-checkpoint-without-step": (["--name", "r20", "--resume"],
                                       ["last.pt", "damaged checkpoint", "step"], None),
    "resume-checkpoint-parts-not-a-list": (["--name", "r20", "--resume"],
                                           ["last.pt", "damaged checkpoint", "parts"], None),
    "checkpoint-every-0": (["--checkpoint-every", "0"], ["--checkpoint-every"], None),
    "on-nonfinite-bogus": (["--on-nonfinite", "ignore"], ["--on-nonfinite"], None),
}


def _edit_config(**changes):
    def damage(run: Path) -> None:
        f = run / "run.json"
        info = json.loads(f.read_text())
        info["config"].update(changes)
        f.write_text(json.dumps(info))
    return damage


def _edit_checkpoint(**changes):
    def damage(run: Path) -> None:
        f = run / "checkpoints" / "last.pt"
        state = torch.load(f, weights_only=True)
        for k, v in changes.items():
            if v is None and k == "step":
                del state[k]
            else:
                state[k] = v
        torch.save(state, f)
    return damage


RUN_DAMAGE = {
    "resume-run-json-not-utf8": lambda run: (run / "run.json").write_bytes(b"\xff\xfe{}"),
    "resume-config-steps-a-string": _edit_config(steps="3"),
    "resume-config-milestones-not-a-list": _edit_config(milestones=0.5),
    "resume-skipped-steps-not-a-list": lambda run: (run / "run.json").write_text(json.dumps(
        {**json.loads((run / "run.json").read_text()), "skipped_steps": 3})),
    "resume-checkpoint-without-step": _edit_checkpoint(step=None),
    "resume-checkpoint-parts-not-a-list": _edit_checkpoint(parts=None),
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    return train(NF.replace(steps=2, every=1), out, "r20", dashboard=False).run_dir


@pytest.mark.parametrize("case", list(PROBE_BAD))
def test_probe_bad_input_is_one_line_exit_2_and_changes_nothing(case, small_run, tmp_path,
                                                                monkeypatch) -> None:
    monkeypatch.setattr("gradlab.data.cifar10._fetch", _no_network)
    args, words, setup = PROBE_BAD[case]
    out = tmp_path / "out"
    shutil.copytree(small_run, out / "r20")
    (tmp_path / "notes.txt").write_text("a regular file\n")
    (out / "notarun").mkdir()
    (out / "notarun" / "thesis.tex").write_text("precious\n")
    folder = write_fake_cifar(tmp_path / "cifar")
    if callable(setup):
        setup(folder)
    elif setup == "malicious-checkpoint":
        bad = {"format": 1, "model": {}, "x": _Touch(tmp_path / "pwned")}
        with open(out / "r20" / "checkpoints" / "last.pt", "wb") as f:
            torch.save(bad, f)
    elif setup in ("schema-0", "run-json-garbage"):
        f = out / "r20" / "run.json"
        if setup == "schema-0":
            f.write_text(json.dumps({**json.loads(f.read_text()), "schema_version": 0}))
        else:
            f.write_text("{not json")
    if case in RUN_DAMAGE:
        RUN_DAMAGE[case](out / "r20")
    before = snapshot(tmp_path)
    result = invoke(*PROBE[:1], "--model", "resnet8", "--steps", 2, "--every", 1,
                    "--batch-size", 8, "--device", "cpu", "--no-tensorboard", "-q",
                    "--out", out, *(a.format(tmp=tmp_path) for a in args))
    one_line_error(result, *words)
    assert not result.stdout
    assert snapshot(tmp_path) == before, "the command changed files"
    assert not (tmp_path / "pwned").exists(), "loading ran code from a file"


def test_resuming_a_completed_run_changes_nothing(small_run, tmp_path) -> None:
    run = tmp_path / "r20"
    shutil.copytree(small_run, run)
    before = snapshot(tmp_path, mtimes=True)
    result = invoke("probe", "--resume", "--out", tmp_path, "--name", "r20", "-q")
    assert result.exit_code == 0, result.output
    final = json.loads((run / "run.json").read_text())["final"]
    assert final and result.stdout.startswith(f"completed: {run} (2 steps, already completed)")
    assert "loss" in result.stdout
    # Final values, finish time, metrics and event files: all as they were.
    assert snapshot(tmp_path, mtimes=True) == before


@pytest.mark.parametrize("gone", ["last.pt", "checkpoints"])
def test_a_completed_run_without_its_checkpoint_is_left_alone(small_run, tmp_path,
                                                              gone: str) -> None:
    # (Users delete checkpoints to save disk.) Completed is completed: nothing retrains, nothing
    # is set aside, run.json keeps its status.
    run = tmp_path / "r20"
    shutil.copytree(small_run, run)
    if gone == "last.pt":
        (run / "checkpoints" / "last.pt").unlink()
    else:
        shutil.rmtree(run / "checkpoints")
    before = snapshot(tmp_path, mtimes=True)
    result = invoke("probe", "--resume", "--out", tmp_path, "--name", "r20", "-q",
                    "--no-tensorboard")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path, mtimes=True) == before


def test_resuming_without_a_checkpoint_sets_the_parts_aside(small_run, tmp_path) -> None:
    run = tmp_path / "r20"
    shutil.copytree(small_run, run)
    shutil.rmtree(run / "checkpoints")  # (also without the folder: it is made again)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    parts = {p.name: p.read_bytes() for p in (run / "metrics").glob("part-*.parquet")}
    assert parts
    result = invoke("probe", "--resume", "--out", tmp_path, "--name", "r20", "-q",
                    "--no-tensorboard")
    assert result.exit_code == 0, result.output
    # It trained again from step 0; what it had written is kept under metrics/.superseded.
    aside = {p.name: p.read_bytes() for p in (run / "metrics" / ".superseded").glob("*")}
    assert aside == parts
    assert_same_run(small_run, run)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes through chmod 0o500; see out-under-a-file")
def test_read_only_out_dir_is_one_line_exit_2(tmp_path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = invoke("probe", "--model", "resnet8", "--steps", 2, "--every", 1,
                        "--device", "cpu", "-q", "--out", out)
        one_line_error(result, "cannot create run directory", "permission denied")
        assert not list(out.iterdir())
    finally:
        out.chmod(0o700)


def _truncate_part(run: Path) -> None:
    part = sorted((run / "metrics").glob("part-*.parquet"))[-1]
    part.write_bytes(part.read_bytes()[:200])


def _float32_values(run: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = sorted((run / "metrics").glob("part-*.parquet"))[-1]
    t = pq.read_table(part)
    pq.write_table(t.set_column(4, "value", t["value"].cast(pa.float32())), part)


def _schema_2(run: Path) -> None:
    f = run / "run.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "schema_version": 2}))


REPORT_BAD = {
    # id: (report arguments, words the message must contain, damage to the copied run)
    "empty-folder": (["{tmp}/empty"], ["no gradlab runs", "empty"], None),
    "missing-folder": (["{tmp}/nope"], ["no such directory", "nope"], None),
    "a-file": (["{tmp}/notes.txt"], ["not a directory"], None),
    "truncated-part": (["{tmp}/runs/r20"], ["no usable runs", "part-", "unreadable"],
                       _truncate_part),
    "other-schema-version": (["{tmp}/runs/r20"], ["no usable runs", "schema_version 2"],
                             _schema_2),
    "part-of-another-type": (["{tmp}/runs/r20"], ["no usable runs", "part-",
                                                  "column 'value' is float"], _float32_values),
    "unknown-format": (["{tmp}/runs/r20", "--format", "html,docx"], ["unknown format 'docx'"],
                       None),
    "unknown-claim": (["{tmp}/runs/r20", "--claims", "degredation"],
                      ["unknown claim", "degradation"], None),
    "out-under-a-file": (["{tmp}/runs/r20", "--out", "{tmp}/notes.txt/report"],
                         ["cannot write the report", "notes.txt"], None),
}


@pytest.mark.parametrize("case", list(REPORT_BAD))
def test_report_bad_input_is_one_line_exit_2_and_changes_nothing(case, small_run,
                                                                 tmp_path) -> None:
    args, words, damage = REPORT_BAD[case]
    shutil.copytree(small_run, tmp_path / "runs" / "r20")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("a regular file\n")
    if damage:
        damage(tmp_path / "runs" / "r20")
    before = snapshot(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "report")]
    result = invoke("report", *args)
    one_line_error(result, *words)
    assert snapshot(tmp_path) == before, "the command changed files"


# -- safe loading -------------------------------------------------------------------------------
def test_checkpoints_are_loaded_weights_only(tmp_path, monkeypatch) -> None:
    from gradlab import checkpoint as ckpt
    from gradlab.runs import RunError

    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"format": 1, "model": {}, "x": _Touch(marker)}, path)
    with pytest.raises(RunError) as e:
        ckpt.load(path)
    assert str(e.value) == (f"{path}: corrupt or unsafe checkpoint, refused by the weights-only "
                            "loader (Unsupported global: GLOBAL getattr was not an "
                            "allowed global by default)")
    assert not marker.exists()

    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    good = tmp_path / "good.pt"
    torch.save({"format": 1, "model": {"w": torch.ones(2)}, "step": 3, "parts": []}, good)
    assert ckpt.load(good)["step"] == 3
    assert seen and all(kw.get("weights_only") is True for kw in seen)


@pytest.mark.parametrize("args", [["--resume"], ["--force"]], ids=["resume", "force"])
def test_a_run_another_process_writes_is_left_alone(args, small_run, tmp_path) -> None:
    # Another process holds the run directory's lock (a child, as a real second job would).
    pytest.importorskip("fcntl")  # (the lock needs flock)
    run = tmp_path / "r20"
    shutil.copytree(small_run, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
         "time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path, mtimes=True)
        result = invoke("probe", "--model", "resnet8", "--steps", 2, "--every", 1,
                        "--batch-size", 8, "--device", "cpu", "--no-tensorboard", "-q",
                        "--out", tmp_path, "--name", "r20", *args)
        one_line_error(result, "being written by another gradlab process")
        assert snapshot(tmp_path, mtimes=True) == before
    finally:
        holder.kill()
        holder.wait()
    # Once that process is gone, the run is the command's again.
    result = invoke("probe", "--model", "resnet8", "--steps", 2, "--every", 1,
                    "--batch-size", 8, "--device", "cpu", "--no-tensorboard", "-q",
                    "--out", tmp_path, "--name", "r20", *args)
    assert result.exit_code == 0, result.output


# -- writer failures ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["parquet", "tensorboard"])
def test_a_failing_writer_fails_the_run_without_hanging_or_losing_rows(tmp_path, monkeypatch,
                                                                       where) -> None:
    """Disk full at the first checkpoint's flush (Parquet), or TensorBoard failing: the run stops
    with one RunError instead of waiting forever on the writer thread, run.json says failed, and
    every row logged before the failure is on disk (Parquet retried its part at the end)."""
    import threading

    import pandas as pd

    from gradlab.dashboard import Dashboard
    from gradlab.runs import MetricWriter, RunError

    calls = {"n": 0}
    if where == "parquet":
        real = MetricWriter.flush

        def flush(self):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(28, "No space left on device")
            return real(self)

        monkeypatch.setattr(MetricWriter, "flush", flush)
    else:
        def log(self, step, cols):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Dashboard, "log", log)
    cfg = NF.replace(steps=8, every=1, checkpoint_every=4, eval_every=100)
    out: dict = {}

    def run():
        try:
            train(cfg, tmp_path, "w", dashboard=where == "tensorboard")
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the run hangs on its failed writer"
    assert isinstance(out.get("error"), RunError), out
    assert "No space left on device" in str(out["error"])
    info = json.loads((tmp_path / "w" / "run.json").read_text())
    assert info["status"] == "failed"
    # What was handed to the writer before the run noticed (at its next call) is on disk, the
    # failed part's rows included: written by the run's last flush.
    steps = sorted(pd.read_parquet(tmp_path / "w" / "metrics")["step"].unique())
    assert steps and steps == list(range(len(steps)))
    if where == "parquet":
        assert calls["n"] >= 2  # the failed part was tried again


@pytest.mark.parametrize("where", ["gradient", "output"])
def test_a_skipped_step_leaves_batchnorm_statistics_and_probed_equals_unprobed(
        where: str, tmp_path) -> None:
    """A skipped step (unlogged step 7) changes nothing: not the weights, and not the BatchNorm
    running statistics its forward updated (an inf conv output would make them NaN and every
    later evaluation NaN); nor does the probe's extra forward that finds the layer. So a probed
    and an unprobed run end with the same weights and buffers."""
    cfg = NF.replace(nonfinite="skip")
    ends = {}
    for probe in (True, False):
        name = f"skip-{where}-{probe}"
        result = train(cfg, tmp_path, name, dashboard=False, probe=probe,
                       on_model=inject_inf(7, where))
        assert result.status == "completed"
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert info["skipped_steps"] == [7]
        ends[probe] = checkpoint(tmp_path / name)["model"]
        df = load_run(tmp_path / name).metrics
        test_loss = df[df.metric == "test_loss"]
        assert np.isfinite(test_loss.value).all(), test_loss
    assert all(torch.isfinite(v.float()).all() for v in ends[True].values())
    assert ends[True].keys() == ends[False].keys()
    for k in ends[True]:
        assert torch.equal(ends[True][k], ends[False][k]), k


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "interrupted"),
                                           (RuntimeError, "failed")])
def test_a_run_stopped_during_its_setup_is_recorded(tmp_path, error, status) -> None:
    """Ctrl-C in the moment after the run directory is made (before the run's own signal
    handler is in place), or a failure there: run.json says so instead of "running"."""
    def boom(model):
        raise error("stopped during setup")

    with pytest.raises(error):
        train(NF, tmp_path, "early", dashboard=False, on_model=boom)
    info = json.loads((tmp_path / "early" / "run.json").read_text())
    assert info["status"] == status
    if status == "failed":
        assert info["failure"]["reason"] == "RuntimeError: stopped during setup"
