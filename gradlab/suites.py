"""Probe suites: a TOML file declares models x seeds on one data set and the claims to test;
:func:`run_suite` trains what is missing (skipping completed runs, resuming interrupted ones)
and writes the report.

Format (``probes/near-identity.toml``)::

    name = "near-identity"
    description = "..."
    dataset = "digits"
    models = ["plain20", "plain56", "resnet20", "resnet56"]
    seeds = [0, 1, 2]
    steps = 600
    every = 10
    claims = ["degradation", "smaller-responses", "near-identity", "gradient-flow"]

    [train]            # any other TrainConfig field: lr, batch_size, warmup_steps, ...
    warmup_steps = 50
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a backport
    import tomli as tomllib

from gradlab.config import ConfigError, TrainConfig, stored_dir
from gradlab.models import model_info

__all__ = ["Suite", "SuiteError", "load_suite", "bundled_suites", "run_suite", "SuiteResult"]


class SuiteError(ValueError):
    """A suite that cannot be read or run; ``str(e)`` is one line for the CLI."""


_TOP_KEYS = {"name": str, "description": str, "dataset": str, "models": list, "seeds": list,
             "steps": int, "epochs": (int, float), "every": int, "claims": list, "train": dict,
             "data_dir": str}
# Fields a suite sets at its top level or that identify a run; [train] may set the others.
_KIND_NAMES = {str: "a string", int: "an integer", (int, float): "a number", list: "a list",
               dict: "a table"}
_NOT_IN_TRAIN = {"model", "dataset", "seed", "steps", "epochs", "every", "data_dir", "extra"}
# An example value of the [train] fields whose default is None (so the default cannot tell).
_OPTIONAL_KIND = {"eval_every": 1, "checkpoint_every": 1}


@dataclass(frozen=True)
class Suite:
    """A parsed suite: which runs it needs and which claims it tests."""

    name: str
    dataset: str
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int | None
    epochs: float | None
    every: int
    claims: tuple[str, ...]
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    data_dir: str | None = None
    source: str = ""

    def configs(self) -> list[tuple[str, TrainConfig]]:
        """(run name, config) of every run, models in order, then seeds."""
        out = []
        for model in self.models:
            for seed in self.seeds:
                cfg = TrainConfig(model=model, dataset=self.dataset, seed=seed, steps=self.steps,
                                  epochs=self.epochs, every=self.every, data_dir=self.data_dir,
                                  **self.train)
                out.append((f"{model}-s{seed}", cfg))
        return out


def bundled_suites() -> dict[str, Path]:
    """Suites shipped with gradlab (``probes/*.toml``), by name; found after pip install too."""
    found: dict[str, Path] = {}
    try:
        root = importlib.resources.files("gradlab._probes")
        for entry in root.iterdir():
            if entry.name.endswith(".toml"):
                found[entry.name[:-5]] = Path(str(entry))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return dict(sorted(found.items()))


def _resolve(spec: str | Path) -> Path:
    """A suite file if ``spec`` is an existing file or ends in .toml, else a bundled suite's name.

    Anything else that exists (a folder, e.g. the ``near-identity/`` that ``gradlab run
    near-identity --runs .`` creates) must not hide the bundled suite of that name.
    """
    p = Path(spec)
    if p.is_file():
        return p
    if p.suffix == ".toml":
        raise SuiteError(f"suite file {p} {'is not a file' if p.exists() else 'not found'}")
    bundled = bundled_suites()
    if str(spec) in bundled:
        return bundled[str(spec)]
    names = ", ".join(bundled) or "none"
    raise SuiteError(f"unknown suite {str(spec)!r}: not a suite file (.toml), and not a bundled "
                     f"suite ({names})")


def load_suite(spec: str | Path) -> Suite:
    """Read and validate a suite from a path or a bundled suite's name."""
    path = _resolve(spec)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(_TOP_KEYS))}; training options go under [train])")
    for key, typ in _TOP_KEYS.items():
        if key in raw and (not isinstance(raw[key], typ) or isinstance(raw[key], bool)):
            raise SuiteError(f"{path}: {key} must be {_KIND_NAMES[typ]}, got {raw[key]!r}")
    for key in ("name", "dataset", "models", "seeds"):
        if key not in raw:
            raise SuiteError(f"{path}: missing required key {key!r}")
    if not raw["models"] or not all(isinstance(m, str) for m in raw["models"]):
        raise SuiteError(f"{path}: models must be a non-empty list of model names")
    if not raw["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool)
                                   for s in raw["seeds"]):
        raise SuiteError(f"{path}: seeds must be a non-empty list of integers")
    bad_seeds = [s for s in raw["seeds"] if not 0 <= s < 2**32]
    if bad_seeds:  # the data split's random_state takes 0 .. 2**32 - 1
        raise SuiteError(f"{path}: seeds must be in [0, 2**32), got {bad_seeds[0]}")
    for key in ("models", "seeds"):
        twice = sorted({str(v) for v in raw[key] if raw[key].count(v) > 1})
        if twice:  # one run directory per (model, seed): a repeat would be trained once
            raise SuiteError(f"{path}: {key} lists {', '.join(twice)} more than once")
    not_finite = _first_non_finite(raw)
    if not_finite:  # TOML has inf and nan; no option means anything with them
        raise SuiteError(f"{path}: {not_finite} must be a finite number")
    from gradlab.data import DATASETS

    if raw["dataset"] not in DATASETS:
        raise SuiteError(f"{path}: unknown dataset {raw['dataset']!r} (choose one of: "
                         f"{', '.join(DATASETS)})")
    if "steps" in raw and "every" in raw and raw["every"] > raw["steps"] > 0:
        raise SuiteError(f"{path}: every = {raw['every']} is larger than the run "
                         f"({raw['steps']} steps)")
    name = raw["name"]
    if not name or name.startswith(".") or any(c in name for c in "/\\\x00"):
        raise SuiteError(f"{path}: name {name!r} must be a plain directory name")
    for m in raw["models"]:
        try:
            model_info(m)
        except ValueError as e:
            raise SuiteError(f"{path}: {e}") from None
    from gradlab.report import CLAIMS

    claims = raw.get("claims", list(CLAIMS))
    bad = [c for c in claims if c not in CLAIMS]
    if bad or not all(isinstance(c, str) for c in claims):
        raise SuiteError(f"{path}: unknown claim(s) {bad} (known: {', '.join(CLAIMS)})")
    train = dict(raw.get("train", {}))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in train.items():
        if key not in fields or key in _NOT_IN_TRAIN:
            allowed = sorted(set(fields) - _NOT_IN_TRAIN)
            raise SuiteError(f"{path}: unknown [train] key {key!r} (allowed: "
                             f"{', '.join(allowed)})")
        default = getattr(TrainConfig(), key)
        if isinstance(default, tuple) and isinstance(value, list):
            if not all(_same_kind(default[0], v) for v in value):
                raise SuiteError(f"{path}: [train] {key} must be a list like {list(default)!r}, "
                                 f"got {value!r}")
            train[key] = tuple(value)
        elif default is not None and not _same_kind(default, value):
            raise SuiteError(f"{path}: [train] {key} must be like {default!r}, got {value!r}")
        elif key in _OPTIONAL_KIND and not _same_kind(_OPTIONAL_KIND[key], value):
            raise SuiteError(f"{path}: [train] {key} must be "
                             f"{_KIND_NAMES[type(_OPTIONAL_KIND[key])]}, got {value!r}")
    suite = Suite(name=name, dataset=raw["dataset"], models=tuple(raw["models"]),
                  seeds=tuple(raw["seeds"]), steps=raw.get("steps"), epochs=raw.get("epochs"),
                  every=raw.get("every", 10), claims=tuple(claims), train=train,
                  description=raw.get("description", ""), data_dir=raw.get("data_dir"),
                  source=str(path))
    try:
        for _, cfg in suite.configs():
            cfg.validate()
    except (ConfigError, TypeError) as e:
        raise SuiteError(f"{path}: {e}") from None
    return suite


def _first_non_finite(raw: dict[str, Any]) -> str | None:
    """The first key (``epochs``, ``[train] lr``, ...) holding an inf or nan, if any."""
    items = [(k, v) for k, v in raw.items() if k != "train"]
    if isinstance(raw.get("train"), dict):
        items += [(f"[train] {k}", v) for k, v in raw["train"].items()]
    for key, value in items:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return key
    return None


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


@dataclass
class SuiteResult:
    """What :func:`run_suite` did: runs trained, skipped, resumed, failed, and the report.

    ``signal`` (SIGINT, SIGTERM) is set when a signal stopped the suite: no further run and no
    report. ``interrupted`` names the run it stopped, resumable (``interrupted_at``: its step),
    or, for a signal between two runs, the run that was not started (``interrupted_at`` None);
    it is None for a signal after the last run, before the report.
    """

    suite: Suite
    runs_dir: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    report: Any = None
    seconds: float = 0.0
    interrupted: str | None = None
    interrupted_at: int | None = None
    signal: int | None = None


def run_suite(spec: str | Path, *, runs_root: Path = Path("runs"),
              reports_root: Path = Path("reports"), progress: bool = False,
              formats: tuple[str, ...] = ("html", "pdf"), report: bool = True,
              on_run: Callable[[str, str], None] | None = None) -> SuiteResult:
    """Run every run ``spec`` needs into ``runs_root/<suite>/`` and report to
    ``reports_root/<suite>/``.

    A completed run with the same configuration is skipped; an interrupted or still-"running"
    one (killed) is resumed from its checkpoint; a run with a different configuration is an
    error (delete it or change the suite's name), so a report never mixes settings silently.
    A run that fails (non-finite loss) is kept as failed and shown by the report. A run stopped
    by SIGINT or SIGTERM stops the suite: no further run, no report (``result.interrupted``);
    so does one that arrives between two runs or before the report (``result.signal``).

    Everything that can be found wrong before training (the suite, existing runs, the device,
    the report's formats and folder) is checked before the first run starts.
    """
    import time

    from gradlab.training import NonFiniteError, resolve_device, stop_on_signals, train

    suite = load_suite(spec)
    t0 = time.perf_counter()
    runs_dir = Path(runs_root) / suite.name
    result = SuiteResult(suite, runs_dir)
    plan = _plan(suite, runs_dir)
    for device in sorted({cfg.device for _, cfg, _ in plan}):
        resolve_device(device)  # e.g. cuda asked for on a machine without one
    if report:
        _check_report_target(formats, Path(reports_root) / suite.name)
    # The suite's own handler covers the gaps between runs (loading data, building a model);
    # each run installs its handler over it, on the same list, and puts it back when it ends.
    stop: list[int] = []
    with stop_on_signals(stop):
        for run_name, cfg, action in plan:
            if action == "skipped":
                result.skipped.append(run_name)
                if on_run:
                    on_run(run_name, "skipped")
                continue
            if stop:  # a signal between two runs: this one is not started
                result.interrupted, result.signal = run_name, stop[0]
                break
            resume = action == "resuming"
            if not resume:
                for leftover in _empty_leftover(runs_dir / run_name):
                    leftover.rmdir()
            if on_run:
                on_run(run_name, action)
            try:
                out = train(cfg, runs_dir, run_name, resume=resume, progress=progress, stop=stop)
            except NonFiniteError:
                result.failed.append(run_name)
                continue
            if out.status == "interrupted":
                # The run is checkpointed and marked interrupted (resumable); a user who pressed
                # Ctrl-C or a scheduler that sent SIGTERM wants the whole suite to stop now.
                result.interrupted, result.interrupted_at = run_name, out.steps
                result.signal = out.signal
                if on_run:
                    on_run(run_name, "interrupted")
                break
            (result.resumed if resume else result.trained).append(run_name)
    # Read once the handler is gone: signal.signal() runs the handler of a signal that arrived
    # before the swap, so none is lost between this check and the default handler.
    if stop and result.signal is None:  # after the last run: no report either
        result.signal = stop[0]
    # (From here on a signal ends the process as usual: the report is derived from the runs and
    # is built again by the same command.)
    if report and result.interrupted is None and result.signal is None:
        from gradlab.report import build_report

        # The suite's own runs only: a run left in its folder by an earlier version of the
        # suite (another model list, other seeds) must not feed its verdicts.
        result.report = build_report([runs_dir / name for name, _, _ in plan],
                                     Path(reports_root) / suite.name,
                                     formats=formats, claims=list(suite.claims),
                                     title=f"gradlab report: {suite.name}")
        try:
            from gradlab.dashboard import write_report

            result.report and write_report(runs_dir / "report", result.report.verdicts_markdown(),
                                           result.report.figures)
        except ImportError:
            pass
    result.seconds = time.perf_counter() - t0
    return result


def _plan(suite: Suite, runs_dir: Path) -> list[tuple[str, TrainConfig, str]]:
    """(run name, config, "skipped" | "resuming" | "training") of every run, read from the run
    directories already there; a conflict with one of them is raised before anything trains."""
    from gradlab.runs import read_run_json

    plan = []
    for run_name, cfg in suite.configs():
        path = runs_dir / run_name
        if not (path / "run.json").exists():
            _empty_leftover(path)  # refuses a folder holding files before anything trains
            plan.append((run_name, cfg, "training"))
            continue
        info = read_run_json(path)
        if _comparable(info.get("config")) != _comparable(cfg.to_dict()):
            raise SuiteError(f"{path} was trained with another configuration than suite "
                             f"{suite.name!r} asks for; move it away or rename the suite")
        status, failure = info.get("status"), info.get("failure")
        # A non-finite failure at a known step would fail the same way again: keep it as it is.
        # Any other state (interrupted, killed while "running", crashed) resumes.
        done = status == "completed" or (status == "failed" and isinstance(failure, dict)
                                         and failure.get("step") is not None)
        last = path / "checkpoints" / "last.pt"
        if not done and last.exists():
            from gradlab import checkpoint as ckpt

            # A damaged checkpoint: one RunError now, not after other runs have trained.
            ckpt.check_parts(last, ckpt.load(last), path / "metrics")
        plan.append((run_name, cfg, "skipped" if done else "resuming"))
    return plan


def _comparable(config) -> object:
    """A config as the suite compares it with a run's: ``data_dir`` resolved, as a run stores it
    (a relative or ``~`` folder in the suite is the same folder)."""
    if not isinstance(config, dict) or not config.get("data_dir"):
        return config
    return {**config, "data_dir": stored_dir(config["data_dir"])}


def _empty_leftover(path: Path) -> list[Path]:
    """The folders (deepest first) of a run directory that has no run.json and holds no file:
    what a run killed while creating its directory leaves, safe to remove so it can start.
    Anything that holds a file is refused, never deleted."""
    if not (path.exists() or path.is_symlink()):
        return []
    if path.is_dir() and not path.is_symlink():
        entries = sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True)
        if all(e.is_dir() and not e.is_symlink() for e in entries):
            return [*entries, path]
    raise SuiteError(f"{path} exists but is not a gradlab run (no run.json); move it away")


def _check_report_target(formats: tuple[str, ...], out_dir: Path) -> None:
    """Refuse unknown report formats and a report folder that cannot be written, before any
    training (nothing is left on disk by the check)."""
    from gradlab.report import ReportError, check_output

    try:
        check_output(out_dir, formats)
    except ReportError as e:
        raise SuiteError(str(e)) from None
