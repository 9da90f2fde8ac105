"""TrainConfig validation: non-finite numbers, out-of-range seeds and devices, and wrong types
from a hand-edited run.json are one-line ConfigErrors, refused before anything is written."""

from __future__ import annotations

import dataclasses
import math

import pytest
from helpers import TINY_SUITE, invoke, one_line_error

from gradlab.config import ConfigError, TrainConfig

FLOATS = ("epochs", "lr", "warmup_lr", "lr_decay", "momentum", "weight_decay")


def _refused(cfg: TrainConfig, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# -- through the CLI: one line, exit 2, no run directory -------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--epochs", "nan"], ["--epochs", "finite"]),
    (["--epochs", "inf"], ["--epochs", "finite"]),
    (["--epochs", "-inf"], ["--epochs", "finite"]),
    (["--epochs", "1e300"], ["--epochs"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--warmup-lr", "-5"], ["--warmup-lr", "positive"]),
    (["--warmup-lr", "0"], ["--warmup-lr", "positive"]),
    (["--warmup-lr", "nan"], ["--warmup-lr", "finite"]),
    (["--warmup-lr", "inf"], ["--warmup-lr", "finite"]),
    (["--seed", "-1"], ["--seed", "2**32"]),
    (["--seed", str(2**32)], ["--seed", "2**32"]),
    (["--seed", "1152921504606846976", "--dataset", "synthetic"], ["--seed", "2**32"]),
    (["--steps", str(2**63)], ["--steps"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_probe_options_are_one_line_and_write_nothing(args, words, tmp_path) -> None:
    out = tmp_path / "runs"
    result = invoke("probe", "--model", "resnet8", "--steps", 3, "--every", 1, "--device", "cpu",
                    "--no-tensorboard", "-q", "--out", out, *args)
    one_line_error(result, *words)
    assert not result.stdout
    assert not list(tmp_path.iterdir()), "a run directory was left behind"


SUITE = TINY_SUITE


@pytest.mark.parametrize("text, words", [
    (SUITE + 'device = "cuda:x"\n', ["--device", "cuda:x"]),
    (SUITE + 'device = "cuda:128"\n', ["--device", "cuda:128"]),
    (SUITE + 'device = "cuda:-1"\n', ["--device"]),
    (SUITE.replace("steps = 6", "epochs = nan"), ["epochs", "finite"]),
    (SUITE + "warmup_lr = nan\n", ["warmup_lr", "finite"]),
    (SUITE + "warmup_lr = -5.0\n", ["--warmup-lr", "positive"]),
    (SUITE + "lr_decay = 2.0\n", ["lr_decay", "(0, 1]"]),
    (SUITE + "weight_decay = inf\n", ["weight_decay", "finite"]),
    (SUITE + "milestones = [0.5, nan]\n", ["milestones"]),
], ids=["cuda-x", "cuda-128", "cuda-minus-1", "epochs-nan", "warmup-lr-nan", "warmup-lr-negative",
        "lr-decay-2", "weight-decay-inf", "milestone-nan"])
def test_bad_suite_values_are_one_line_and_write_nothing(text, words, tmp_path) -> None:
    f = tmp_path / "tiny.toml"
    f.write_text(text)
    result = invoke("run", f, "--runs", tmp_path / "runs", "--reports", tmp_path / "reports",
                    "-q", "--no-report")
    one_line_error(result, *words)
    assert not result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


# -- TrainConfig.validate -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400],
                         ids=["nan", "inf", "-inf", "int-too-large-for-a-float"])
def test_every_float_option_must_be_finite(name: str, value) -> None:
    _refused(TrainConfig().replace(**{name: value}), "finite")


@pytest.mark.parametrize("change, words", [
    ({"warmup_lr": -5.0}, ["--warmup-lr"]), ({"warmup_lr": 0.0}, ["--warmup-lr"]),
    ({"lr": -0.1}, ["--lr"]), ({"lr_decay": 0.0}, ["lr_decay"]), ({"lr_decay": 1.5}, ["lr_decay"]),
    ({"momentum": -0.1}, ["momentum"]), ({"epochs": -1.0}, ["--epochs"]),
    ({"epochs": 2e6}, ["--epochs"]), ({"milestones": (0.0,)}, ["milestones"]),
    ({"seed": -1}, ["--seed"]), ({"seed": 2**32}, ["--seed"]), ({"seed": 2**60}, ["--seed"]),
    ({"batch_size": 2**63}, ["--batch-size"]), ({"every": 2**64}, ["--every"]),
    ({"warmup_steps": 2**63}, ["--warmup-steps"]), ({"eval_every": -1}, ["--eval-every"]),
    ({"device": "cuda:x"}, ["--device"]), ({"device": "cuda:"}, ["--device"]),
    ({"device": "cuda:01"}, ["--device"]), ({"device": "cuda: 1"}, ["--device"]),
    ({"device": "cuda:128"}, ["--device"]), ({"device": "cuda:1:2"}, ["--device"]),
    ({"device": "CUDA"}, ["--device"]), ({"data_dir": "a\x00b"}, ["--data-dir"]),
], ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()) if isinstance(c, dict) else None)
def test_out_of_range_values_are_refused(change: dict, words: list) -> None:
    _refused(TrainConfig().replace(**change), *words)


@pytest.mark.parametrize("change", [
    {"seed": 0}, {"seed": 2**32 - 1}, {"device": "cuda:0"}, {"device": "cuda:127"},
    {"device": "cpu"}, {"device": "mps"}, {"lr_decay": 1.0}, {"lr": 1}, {"epochs": 2},
    {"warmup_lr": 1e-6}, {"momentum": 0}, {"weight_decay": 0}, {"milestones": ()},
    {"epochs": 1e6}, {"steps": 2**63 - 1},
], ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()))
def test_edge_values_are_accepted(change: dict) -> None:
    cfg = TrainConfig().replace(**change)
    assert cfg.validate() is cfg


# -- types: TrainConfig.from_dict (a hand-edited run.json) and validate ---------------------------
@pytest.mark.parametrize("change, words", [
    ({"steps": "3"}, ["steps", "an integer", "'3'"]),
    ({"steps": True}, ["steps", "an integer"]),
    ({"steps": 3.0}, ["steps", "an integer"]),
    ({"milestones": 0.5}, ["milestones", "a list of numbers", "0.5"]),
    ({"milestones": [0.5, "x"]}, ["milestones", "a list of numbers"]),
    ({"milestones": [True]}, ["milestones"]),
    ({"milestones": {"a": 0.5}}, ["milestones"]),
    ({"epochs": True}, ["epochs", "a number"]),
    ({"lr": "0.1"}, ["lr", "a number"]),
    ({"lr": None}, ["lr", "a number"]),
    ({"seed": 1.5}, ["seed", "an integer"]),
    ({"batch_size": [128]}, ["batch_size", "an integer"]),
    ({"device": 0}, ["device", "a string"]),
    ({"model": None}, ["model", "a string"]),
    ({"data_dir": 7}, ["data_dir", "a string or null"]),
    ({"compile": "yes"}, ["compile", "true or false"]),
    ({"augment": 1}, ["augment", "true or false"]),
    ({"extra": []}, ["extra", "a table"]),
    ({"extra": {"x" * 500: 1, 1: 2}}, ["extra", "..."]),
], ids=lambda c: "-".join(f"{k}={v!r:.20}" for k, v in c.items()) if isinstance(c, dict)
    else None)
def test_from_dict_refuses_wrong_types_in_one_line(change: dict, words: list) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**TrainConfig().to_dict(), **change})
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("d", [[1, 2], "config", None], ids=["list", "string", "null"])
def test_from_dict_refuses_a_config_that_is_not_a_table(d) -> None:
    with pytest.raises(ConfigError, match="config must be a table"):
        TrainConfig.from_dict(d)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_field_is_type_checked(name: str) -> None:
    _refused(TrainConfig().replace(**{name: object()}), name)


def test_validate_checks_types_before_ranges() -> None:
    # A string would make the range check's comparison raise TypeError.
    _refused(TrainConfig().replace(steps="3"), "steps must be an integer")
    _refused(TrainConfig().replace(warmup_lr="0.01"), "warmup_lr must be a number")


def test_a_list_of_milestones_becomes_a_tuple() -> None:
    cfg = TrainConfig(milestones=[0.3, 0.6])
    assert cfg.milestones == (0.3, 0.6) and cfg == TrainConfig(milestones=(0.3, 0.6))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg.validate()


def test_ints_are_accepted_where_floats_are_and_kept_exactly() -> None:
    d = {**TrainConfig().to_dict(), "lr": 1, "epochs": 3, "weight_decay": 0}
    cfg = TrainConfig.from_dict(d).validate()
    assert cfg.to_dict() == d


def test_cuda_index_beyond_the_machine_is_a_config_error(monkeypatch) -> None:
    # (Checked where the device is resolved: only there is the number of GPUs known.)
    import torch

    from gradlab.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")
