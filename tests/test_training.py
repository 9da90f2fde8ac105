"""The training loop: schedule, logged steps, run.json, reproducibility and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Interrupt, assert_same_run, checkpoint, interrupt_at, snapshot, table

from gradlab import create_model, training
from gradlab.config import ConfigError, TrainConfig
from gradlab.data import load_dataset
from gradlab.runs import load_run
from gradlab.training import lr_at, total_steps, train

HOOK_METRICS = {"grad_norm", "weight_norm", "response_std", "response_grad_norm",
                "residual_ratio", "residual_cosine", "identity_gap"}


pytestmark = pytest.mark.usefixtures("one_thread")


BASE = TrainConfig(model="resnet20", dataset="digits", steps=8, every=3, batch_size=16,
                   warmup_steps=2, eval_every=4, checkpoint_every=4, seed=0, device="cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = train(BASE, out, "base", dashboard=False)
    return result


# -- schedule ----------------------------------------------------------------------------------
def test_lr_schedule_milestones_at_half_and_three_quarters() -> None:
    cfg = TrainConfig(lr=0.1)
    got = [lr_at(cfg, s, 100) for s in (0, 49, 50, 74, 75, 99)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12)
    # the paper's 64k iterations: divided at 32k and 48k
    assert lr_at(cfg, 31_999, 64_000) == 0.1
    assert lr_at(cfg, 32_000, 64_000) == pytest.approx(0.01)
    assert lr_at(cfg, 48_000, 64_000) == pytest.approx(0.001)


def test_lr_warmup() -> None:
    cfg = TrainConfig(lr=0.1, warmup_steps=400, warmup_lr=0.01)
    assert [lr_at(cfg, s, 64_000) for s in (0, 399)] == [0.01, 0.01]
    assert lr_at(cfg, 400, 64_000) == 0.1
    assert lr_at(TrainConfig(lr=0.2, lr_decay=0.5, milestones=(0.25,)), 30, 100) == 0.1


def test_total_steps() -> None:
    assert total_steps(TrainConfig(steps=7, epochs=3), 1437) == 7
    assert total_steps(TrainConfig(epochs=2, batch_size=100), 1437) == 2 * (1437 // 100)
    assert total_steps(TrainConfig(epochs=0.01, batch_size=100), 1437) == 1
    assert total_steps(TrainConfig(), 1437) == 600


def test_logged_lr_follows_the_schedule(base) -> None:
    df = table(base.run_dir)
    lr = df[df.metric == "lr"].set_index("step").value
    assert lr.to_dict() == {s: lr_at(BASE, s, 8) for s in (0, 3, 6, 7)}
    assert lr[0] == 0.01 and lr[3] == 0.1 and lr[6] == pytest.approx(0.001)


# -- what a run writes -------------------------------------------------------------------------
def test_logged_steps(base) -> None:
    df = table(base.run_dir)
    assert sorted(df[df.metric == "loss"].step) == [0, 3, 6, 7]  # 0, every, ..., and the last
    for s in (0, 3, 6, 7):
        at = df[df.step == s]
        assert HOOK_METRICS | {"loss", "accuracy", "lr"} <= set(at.metric), s
        assert (at[at.metric == "residual_ratio"].shape[0]) == 9
    assert set(df[df.metric.isin(HOOK_METRICS)].step) == {0, 3, 6, 7}
    model_wide = df[df.layer == ""]
    assert (model_wide.depth == -1).all()
    assert set(model_wide.metric) == {"loss", "accuracy", "lr", "test_loss", "test_accuracy"}
    assert (df[df.layer != ""].depth >= 0).all()
    assert df.value.map(math.isfinite).all()


def test_test_metrics_at_the_end(base) -> None:
    df = table(base.run_dir)
    for m in ("test_loss", "test_accuracy"):
        rows = df[df.metric == m].set_index("step").value
        assert sorted(rows.index) == [4, 8]  # every eval_every steps and after the last step
        assert base.final[m] == pytest.approx(rows[8], rel=1e-6)
    acc = df[df.metric.isin(["accuracy", "test_accuracy"])].value
    assert ((acc >= 0) & (acc <= 1)).all()
    assert base.status == "completed" and base.steps == 8


def test_run_json(base) -> None:
    info = json.loads((base.run_dir / "run.json").read_text())
    assert info["schema_version"] == 1 and info["status"] == "completed"
    assert info["finished"] and info["failure"] is None
    assert info["config"] == BASE.to_dict()
    assert TrainConfig.from_dict(info["config"]) == BASE
    n = sum(p.numel() for p in create_model("resnet20", in_channels=1).parameters())
    assert info["model"] == {"name": "resnet20", "family": "resnet", "depth": 20,
                             "residual": True, "shortcut": "A", "parameters": n}
    assert info["data"]["name"] == "digits" and info["data"]["channels"] == 1
    assert info["data"]["num_classes"] == 10
    assert info["data"]["train_size"] + info["data"]["test_size"] == 1797
    assert info["versions"]["torch"] == torch.__version__
    assert {"gradlab", "python"} <= set(info["versions"])
    assert info["seed"] == 0 and info["total_steps"] == 8 and info["device"] == "cpu"
    # (the kernels build here: the residual sum and the ReLUs take their passes on CPU)
    assert info["fast_path"]["fused_relu"] is True
    assert info["final"]["test_loss"] == pytest.approx(base.final["test_loss"])
    assert load_run(base.run_dir).config == BASE.to_dict()


def test_no_temporary_files_left(base) -> None:
    hidden = [p for p in base.run_dir.rglob("*") if p.name.startswith(".")]
    assert not hidden
    assert sorted(p.name for p in (base.run_dir / "checkpoints").iterdir()) == ["last.pt"]


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    TrainConfig(),
    BASE,
    TrainConfig(model="plain56", dataset="cifar10", data_dir="/data", epochs=1.5, lr=0.05,
                milestones=(0.3, 0.6, 0.9), shortcut="B", zero_init_residual=True, amp="bf16",
                channels_last="off", compile=True, augment=False, nonfinite="skip",
                extra={"note": "x", "n": [1, 2]}),
], ids=["defaults", "base", "everything-changed"])
def test_config_round_trips(cfg: TrainConfig) -> None:
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert isinstance(TrainConfig.from_dict(cfg.to_dict()).milestones, tuple)


def test_config_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_dict({**BASE.to_dict(), "bogus": 1})


@pytest.mark.parametrize("change", [
    {"steps": 0}, {"steps": -3}, {"epochs": 0.0}, {"batch_size": 0}, {"lr": 0.0},
    {"lr": float("nan")}, {"every": 0}, {"eval_every": 0}, {"checkpoint_every": -1},
    {"warmup_steps": -1}, {"momentum": 1.0}, {"weight_decay": -1e-4}, {"milestones": (0.5, 1.0)},
    {"shortcut": "C"}, {"amp": "fp8"}, {"channels_last": "yes"}, {"device": "tpu"},
    {"nonfinite": "ignore"},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_invalid_config_is_one_line(change: dict, tmp_path) -> None:
    with pytest.raises(ConfigError) as e:
        train(BASE.replace(**change), tmp_path, "x", dashboard=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_every_larger_than_the_run_is_refused_before_writing(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--every"):
        train(BASE.replace(steps=5, every=6), tmp_path, "x", dashboard=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "a\\b"])
def test_run_names_are_one_path_component(name: str, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError):
        train(BASE, out, name, dashboard=False)
    assert not (tmp_path / "evil").exists() and not out.exists()


# -- reproducibility and resume ----------------------------------------------------------------
def test_same_seed_same_metrics_and_weights(base, tmp_path) -> None:
    again = train(BASE, tmp_path, "again", dashboard=False)
    assert_same_run(base.run_dir, again.run_dir)
    other = train(BASE.replace(seed=1, steps=1, every=1), tmp_path, "other", dashboard=False)
    lo = table(other.run_dir)
    lb = table(base.run_dir)
    assert lo[(lo.metric == "loss")].value.iloc[0] != lb[(lb.metric == "loss")].value.iloc[0]


RESUME = TrainConfig(model="resnet20", dataset="digits", steps=9, every=2, batch_size=16,
                     eval_every=3, checkpoint_every=4, seed=1, device="cpu")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(RESUME, tmp_path_factory.mktemp("full"), "run", dashboard=False).run_dir


@pytest.mark.parametrize("stop", [7, 2], ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_resume_gives_the_uninterrupted_run(stop: int, uninterrupted, tmp_path) -> None:
    with pytest.raises(Interrupt):
        train(RESUME, tmp_path, "run", dashboard=False, on_model=interrupt_at(stop))
    cut = tmp_path / "run"
    info = json.loads((cut / "run.json").read_text())
    assert info["status"] == "failed" and "Interrupt" in info["failure"]["reason"]
    ckpt = cut / "checkpoints" / "last.pt"
    if stop > 4:
        assert checkpoint(cut)["step"] == 4
        # rows of steps 4..6 were written after the checkpoint: they are on disk before resume
        assert table(cut).step.max() > 4
    else:
        assert not ckpt.exists()
    # resume takes the saved config, whatever is passed
    result = train(BASE.replace(seed=99), tmp_path, "run", resume=True, dashboard=False)
    assert result.status == "completed" and result.steps == 9
    info = json.loads((cut / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_at"] == (4 if stop > 4 else 0)
    assert info["config"] == RESUME.to_dict()

    assert checkpoint(cut)["step"] == 9
    assert_same_run(uninterrupted, cut)
    raw = pd.read_parquet(cut / "metrics")
    loaded = load_run(cut).metrics
    assert len(loaded) == len(raw)
    assert sorted(raw[raw.metric == "loss"].step) == [0, 2, 4, 6, 8]


def test_resume_needs_an_existing_run(tmp_path) -> None:
    from gradlab.runs import RunError

    with pytest.raises(RunError, match="no such run directory"):
        train(BASE, tmp_path, "missing", resume=True, dashboard=False)
    assert not list(tmp_path.iterdir())


def test_existing_run_is_not_overwritten_without_force(base, tmp_path) -> None:
    from gradlab.runs import RunError

    first = train(BASE.replace(steps=1, every=1), tmp_path, "r", dashboard=False)
    before = snapshot(first.run_dir)
    with pytest.raises(RunError, match="already exists"):
        train(BASE.replace(steps=1, every=1), tmp_path, "r", dashboard=False)
    assert snapshot(first.run_dir) == before
    forced = train(BASE.replace(steps=2, every=1), tmp_path, "r", force=True, dashboard=False)
    assert sorted(table(forced.run_dir)[lambda d: d.metric == "loss"].step) == [0, 1]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda good: b"", id="empty"),
    pytest.param(lambda good: b"hello", id="text"),
    pytest.param(lambda good: b"(.", id="pickle-stack-underflow"),
    pytest.param(lambda good: b"J", id="pickle-short-int"),
    pytest.param(lambda good: b"\0" * 4096, id="zeros"),
    pytest.param(lambda good: good[: len(good) // 2], id="truncated-half"),
    pytest.param(lambda good: good[:100], id="truncated-header"),
    pytest.param(lambda good: good[-4096:], id="tail-only"),
])
def test_damaged_checkpoint_is_a_one_line_run_error(damage, base, tmp_path) -> None:
    from gradlab import checkpoint
    from gradlab.runs import RunError

    path = tmp_path / "last.pt"
    path.write_bytes(damage((base.run_dir / "checkpoints" / "last.pt").read_bytes()))
    with pytest.raises(RunError) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("edit, words", [
    ({"step": 10**6}, "step 1000000 is past the run's 8 steps"),
    ({"parts": ["part-000099.parquet"]}, "does not hold: part-000099.parquet"),
], ids=["step-past-the-end", "parts-not-there"])
def test_a_checkpoint_that_does_not_fit_its_run_is_refused_untouched(base, tmp_path, edit,
                                                                    words) -> None:
    # A damaged checkpoint of an interrupted run: refused before anything is moved aside.
    import shutil

    from gradlab.runs import RunError

    run = tmp_path / "r"
    shutil.copytree(base.run_dir, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, **edit}, last)
    before = snapshot(tmp_path, mtimes=True)
    with pytest.raises(RunError) as e:
        train(BASE, tmp_path, "r", resume=True, dashboard=False)
    assert "damaged checkpoint" in str(e.value) and words in str(e.value)
    assert snapshot(tmp_path, mtimes=True) == before


def test_a_relative_data_dir_is_stored_absolute(tmp_path, monkeypatch) -> None:
    from gradlab.data import cifar10  # noqa: F401 - the reader the run uses

    monkeypatch.chdir(tmp_path)
    seen = []
    real = training.load_dataset
    monkeypatch.setattr(training, "load_dataset",
                        lambda name, data_dir=None, **kw: seen.append(data_dir)
                        or real("digits", None, **kw))
    train(BASE.replace(steps=2, every=1, data_dir="data"), "runs", "rel", dashboard=False)
    stored = json.loads((tmp_path / "runs" / "rel" / "run.json").read_text())["config"]
    assert stored["data_dir"] == str(tmp_path / "data") == seen[0]


def test_non_finite_loss_stops_the_run_quietly(tmp_path) -> None:
    import warnings

    from gradlab.training import NonFiniteError

    cfg = BASE.replace(steps=4, every=2, lr=1e30, warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is reported once, not with warnings
        with pytest.raises(NonFiniteError) as e:
            train(cfg, tmp_path, "nan", dashboard=False)
    assert "non-finite" in str(e.value) and "step 1" in str(e.value)
    info = json.loads((tmp_path / "nan" / "run.json").read_text())
    assert info["status"] == "failed" and info["failure"]["step"] == 1
    assert info["failure"]["layer"]
    df = table(tmp_path / "nan")
    assert 1 in set(df.step)  # the failing step's measurements are kept for diagnosis


# -- the fast path chosen by --amp auto / --channels-last auto ------------------------------------
@pytest.mark.parametrize("native,side,want", [
    (True, 32, True),    # CIFAR on an AVX512-BF16 / AMX CPU: 1.3x faster in bf16
    (True, 8, False),    # digits: conversions cost more than the small convolutions save
    (False, 32, False),  # emulated bf16 is slower than float32
    (True, None, False),  # image size unknown: keep float32
])
def test_cpu_auto_amp_rule(monkeypatch, native: bool, side: int | None, want: bool) -> None:
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: native)
    cfg = TrainConfig(model="resnet20")
    assert training.fast_path(cfg, torch.device("cpu"), side) == (want, True)
    assert training.fast_path(cfg.replace(amp="off"), torch.device("cpu"), side)[0] is False
    assert training.fast_path(cfg.replace(amp="bf16"), torch.device("cpu"), side)[0] is True


@pytest.mark.parametrize("capability,want", [((7, 5), False), ((7, 0), False), ((8, 0), True),
                                             ((9, 0), True)], ids=["T4", "V100", "A100", "H100"])
def test_cuda_auto_amp_needs_native_bf16_on_the_chosen_gpu(monkeypatch, capability,
                                                          want: bool) -> None:
    # Emulated bf16 (before compute capability 8.0) has no bf16 convolutions: float32 there,
    # decided for the device the run uses (cuda:1 here), not the current one.
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    dev = torch.device("cuda", 1)
    assert training.fast_path(TrainConfig(model="resnet20"), dev, 32) == (want, True)
    assert asked == [dev]


def test_checkpoints_hold_no_gpu_generator_state(tmp_path, monkeypatch) -> None:
    from gradlab import checkpoint as ckpt

    def no_cuda(*a, **k):
        raise AssertionError("a checkpoint touched CUDA")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_cuda)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "last.pt"
    ckpt.save(path, model, opt, gen, 3, [], TrainConfig(model="resnet20"))
    state = ckpt.load(path)
    assert "cuda_rng" not in state
    # An older checkpoint's entry (states of GPUs this machine may not have) is ignored, also
    # where CUDA is available (set_rng_state_all would raise).
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ckpt.restore(state, model, opt, gen) == 3


def test_trainer_resolves_precision_from_the_data_set(monkeypatch) -> None:
    monkeypatch.setattr(training, "cpu_native_bf16", lambda: True)
    data = load_dataset("synthetic", synthetic_size=32, seed=0)
    tr = training.Trainer(TrainConfig(model="resnet8", dataset="synthetic", batch_size=8,
                                      steps=2), data, torch.device("cpu"))
    assert tr.amp and tr.cl
    digits = training.Trainer(TrainConfig(model="resnet8", batch_size=8, steps=2),
                              load_dataset("digits", seed=0), torch.device("cpu"))
    assert not digits.amp


def _tensorboard(run: Path, loader: str = "server") -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of a run: (step, value) of every scalar tag, and the steps of its
    depth-profile images, read over all of the run's event files by TensorBoard's own loader:
    the one its server uses (``plugin_event_accumulator``, ``--load_fast=false``) or the
    classic ``event_accumulator``."""
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
    from tensorboard.util import tensor_util

    if loader == "classic":
        ea = event_accumulator.EventAccumulator(str(run / "tb"),
                                                size_guidance={"scalars": 0, "images": 0})
        ea.Reload()
        shown = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
        shown["images"] = [(e.step, 0.0) for t in ea.Tags()["images"] for e in ea.Images(t)]
        return shown
    ea = plugin_event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    shown = {}
    for tag in ea.Tags()["tensors"]:
        events = ea.Tensors(tag)
        if tag == "depth_profile":
            shown["images"] = [(e.step, 0.0) for e in events]
        elif all(not e.tensor_proto.tensor_shape.dim for e in events) and \
                ea.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
            shown[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                          for e in events]
    return shown


@pytest.mark.parametrize("stop, eval_every", [(7, 3), (2, 3), (7, 4)],
                         ids=["after-a-checkpoint", "before-any-checkpoint",
                              "evaluated-at-the-checkpoint"])
def test_a_resumed_runs_dashboard_shows_the_uninterrupted_run(stop: int, eval_every: int,
                                                              tmp_path) -> None:
    """The resumed session's event file starts with a restart marker at the step it resumes
    from, so TensorBoard drops the points the interrupted session wrote from there on (trained
    again) and shows each step once, as for an uninterrupted run; depth-profile images keep
    their schedule. An evaluation made at the checkpoint's step (before it) is shown too."""
    cfg = RESUME.replace(eval_every=eval_every)
    full = train(cfg, tmp_path / "full", "run").run_dir
    with pytest.raises(Interrupt):
        train(cfg, tmp_path, "run", on_model=interrupt_at(stop))
    train(cfg, tmp_path, "run", resume=True)
    assert len(list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))) == 2
    for loader in ("server", "classic"):
        want, got = _tensorboard(full, loader), _tensorboard(tmp_path / "run", loader)
        assert sorted(got) == sorted(want)
        for tag in want:
            assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], (loader, tag)
            if tag != "images_per_s" and tag != "images":
                np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]],
                                           rtol=1e-6, err_msg=tag)
        assert [s for s, _ in want["loss"]] == [0, 2, 4, 6, 8]
        assert len(want["images"]) == 5
        assert [s for s, _ in want["test_loss"]] == ([3, 6, 9] if eval_every == 3 else [4, 8, 9])


def test_a_run_without_a_first_session_marker_is_still_purged_on_resume(tmp_path) -> None:
    """Event files of a first session that wrote no SessionLog.START (gradlab before the
    marker): resumed twice, TensorBoard's server-side loader still shows each step once."""
    from tensorboard.compat.proto import event_pb2

    from gradlab.dashboard import Dashboard, _crc32c_function, _record

    def session(resumed_at, steps):
        dash = Dashboard(tmp_path / "tb", None, max_images=0, resumed_at=resumed_at)
        for step in steps:
            dash.log(step, {"layer": np.array([""], dtype=object), "depth": np.array([-1]),
                            "metric": np.array(["loss"], dtype=object),
                            "value": np.array([float(step)])})
        dash.close(status="interrupted")

    session(None, range(6))
    (first,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    kept = [e for e in _records(first) if not e.HasField("session_log")]
    crc = _crc32c_function()
    first.write_bytes(b"".join(_record(e.SerializeToString(), crc) for e in kept))
    assert not any(event_pb2.Event.FromString(r).HasField("session_log")
                   for r in _raw(first))  # as an old first session left it
    session(3, [3, 4])
    session(4, [4])
    assert [s for s, _ in _tensorboard(tmp_path)["loss"]] == [0, 1, 2, 3, 4]


def _raw(path: Path) -> list[bytes]:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    return list(RawEventFileLoader(str(path)).Load())


def _records(path: Path):
    from tensorboard.compat.proto import event_pb2

    return [event_pb2.Event.FromString(r) for r in _raw(path)]


@pytest.mark.parametrize("device,non_blocking", [("cuda", True), ("mps", False),
                                                 ("meta", False)])
def test_dataset_copies_overlap_only_on_cuda(monkeypatch, device: str,
                                             non_blocking: bool) -> None:
    # A non-blocking copy to MPS may read its source after the caller freed it; CUDA stages
    # a pageable source before returning.
    data = load_dataset("synthetic", synthetic_size=8, seed=0)
    seen = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: seen.append(k) or self)
    data.to(device)
    assert seen and all(k.get("non_blocking") is non_blocking for k in seen)


# -- the device-side guard of unlogged steps (CUDA; exercised here on CPU) -------------------------
def _guarded_trainer(cfg: TrainConfig) -> training.Trainer:
    """A CPU Trainer taking the GPU's unlogged-step path: the fused SGD (which honours
    ``found_inf`` on CPU too) and the guard on; steps are run with ``check=False``."""
    data = load_dataset("digits")
    tr = training.Trainer(cfg, data, torch.device("cpu"))
    tr.opt = torch.optim.SGD(tr.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay, fused=True)
    tr._params = [p for g in tr.opt.param_groups for p in g["params"]]
    tr._guard = True
    return tr


@pytest.mark.parametrize("probe", [True, False], ids=["probed", "unprobed"])
def test_gpu_guard_skips_a_non_finite_unlogged_update_on_the_device(probe: bool) -> None:
    from test_probe import count_host_calls

    from gradlab.data import batches

    cfg = TrainConfig(model="resnet20", dataset="digits", batch_size=16, steps=10,
                      nonfinite="skip")
    tr = _guarded_trainer(cfg)
    if not probe:
        tr.probe.detach()
        tr.probe = None
    it = batches(tr.data.train_size, 16, seed=0)
    tr.step(next(it), 0.1, logged=True, check=False)  # step 0: the first update (buffers)
    assert tr._momentum_ready()
    w = tr.model.layer2[1].conv1.weight
    poison = {"on": False}
    w.register_hook(lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)

    def state():
        return ([p.detach().clone() for p in tr._params]
                + [tr.opt.state[p]["momentum_buffer"].clone() for p in tr._params]
                + [b.clone() for b in tr._bn_state])

    tr.step(next(it), 0.1, logged=False, check=False)  # a good unlogged step: applied
    before = state()
    poison["on"] = True
    with count_host_calls() as counts:
        _, cols, bad = tr.step(next(it), 0.1, logged=False, check=False)
    counts.pop("to", None)  # (.to of a CPU tensor to the CPU device)
    assert sum(counts.values()) == 0, dict(counts)  # no host read: the test stays on the device
    assert cols is None and bad is False
    after = state()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), \
        "the non-finite update (or its BatchNorm statistics) reached the model"
    poison["on"] = False
    tr.step(next(it), 0.1, logged=False, check=False)  # good again: applied
    assert not torch.equal(tr._params[0], before[0])
    _, cols, bad = tr.step(next(it), 0.1, logged=True, check=False)
    assert tr.late_bad == [2] and not bad  # the step two before this logged one
    assert not any(str(m).startswith("_nonfinite") for m in cols["metric"])
    assert {"loss", "accuracy"} <= set(cols["metric"])
    tr.step(next(it), 0.1, logged=False, check=False)
    assert tr.late_bad == []  # a report is for its own step only
    _, cols, bad = tr.step(next(it), 0.1, logged=True, check=False)
    assert tr.late_bad == []


def test_gpu_guard_in_a_run_stops_or_skips_at_the_next_logged_step(tmp_path, monkeypatch) -> None:
    real_init, real_step = training.Trainer.__init__, training.Trainer.step

    def init(self, cfg, data, device, **kw):
        real_init(self, cfg, data, device, **kw)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, fused=True)
        self._params = [p for g in self.opt.param_groups for p in g["params"]]
        self._guard = True

    monkeypatch.setattr(training.Trainer, "__init__", init)
    monkeypatch.setattr(training.Trainer, "step",
                        lambda self, idx, lr, logged: real_step(self, idx, lr, logged,
                                                                check=False))
    count = {"n": 0}

    def on_model(model):
        def pre(mod, args):
            if mod.training and torch.is_grad_enabled():
                count["n"] += 1

        model.register_forward_pre_hook(pre)
        model.get_submodule("layer2.1.conv1").weight.register_hook(
            lambda g: torch.full_like(g, float("inf")) if count["n"] == 6 else g)  # step 5

    cfg = TrainConfig(model="resnet20", dataset="digits", steps=12, every=4, batch_size=16,
                      seed=0, device="cpu", eval_every=100)
    with pytest.raises(training.NonFiniteError) as e:
        train(cfg, tmp_path, "stop", dashboard=False, on_model=on_model)
    assert str(e.value) == ("non-finite loss or gradient at step 5 (an unlogged step: its "
                            "update was not applied)")
    info = json.loads((tmp_path / "stop" / "run.json").read_text())
    assert info["status"] == "failed" and info["failure"]["step"] == 5
    # Read before the checkpoint due at step 8 (which must not go past the failure): the last
    # checkpoint is still that of step 4, and a resume fails again at step 5.
    assert checkpoint(tmp_path / "stop")["step"] == 4
    count["n"] = 0
    result = train(cfg.replace(nonfinite="skip"), tmp_path, "skip", dashboard=False,
                   on_model=on_model)
    assert result.status == "completed"
    info = json.loads((tmp_path / "skip" / "run.json").read_text())
    assert info["skipped_steps"] == [5]


def test_gpu_guard_keeps_many_unread_checks_in_one_tensor_and_settles_them() -> None:
    from gradlab.data import batches

    cfg = TrainConfig(model="resnet8", dataset="digits", batch_size=8, steps=400)
    tr = _guarded_trainer(cfg)
    it = batches(tr.data.train_size, 8, seed=0)
    tr.step(next(it), 0.05, logged=True, check=False)
    poison = {"at": 270, "n": 0}
    tr.model.fc.weight.register_hook(
        lambda g: torch.full_like(g, float("nan")) if poison["n"] == poison["at"] else g)
    for i in range(300):
        poison["n"] = i
        tr.step(next(it), 0.05, logged=False, check=False)
    assert len(tr._unchecked) < 64  # folded into one tensor past 256
    assert tr.pending and tr.settle() == [299 - 270] and not tr.pending
