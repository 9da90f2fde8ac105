"""Load many run directories for a report: identify each run's model, dataset and seed.

A report reads run directories only (never live objects), so any run, old or new, local or copied
from a cluster, can be reported. Loading is forgiving where a report can still say something and
strict where it cannot:

* A run that cannot be used (unreadable ``run.json``, no metric parts, a truncated or otherwise
  unreadable Parquet part, a model whose family and depth cannot be told) is **skipped, not
  fatal**: it is recorded as ``(path, reason)`` in :attr:`RunSet.skipped` and listed in the report.
  A damaged part skips its whole run rather than just the part, because the rows it held (often
  the last steps, which the claims use) are missing and a silently shortened run would bias the
  "final" values.
* Two runs of the same model, dataset and seed would count one experiment twice (pseudo-
  replication); the later completed one is kept and the other is skipped with the reason.
* No usable run at all is a :class:`ReportError`, whose message names what was skipped and why.

Runs of different datasets may be mixed; claims are then tested within each dataset separately
(see :meth:`RunSet.by_dataset`), never across datasets, since losses and response scales are not
comparable between datasets.

Only the metrics the report needs are kept, and long runs are reduced while they are read:

* A run with at most ``MAX_POINTS`` distinct logged steps is read whole, every row of every
  metric the report uses, exactly as ``gradlab.runs.read_metrics`` returns it.
* A longer run (a 100k-step run logged every step has 82 million rows) is streamed part by part
  (``layer``/``metric`` read as Parquet dictionaries, never as Python strings) and kept as a
  :class:`RunSummary`: model-wide scalars (loss, accuracy, ...) whole; per (metric, layer) the
  mean, min, max and row count in ``MAX_POINTS`` equal step bins (what figures draw); the exact
  rows at the steps the claims look up (the first and last logged step of each metric and, for
  ``EARLY_METRICS``, the first ``EARLY_FRACTION`` of training); and the exact per-layer mean over
  the last ``TAIL_FRACTION`` of logged steps (read in a second pass over just the parts that hold
  it; see :mod:`~gradlab.report.summary`). Any other exact rows are read back from disk on
  request (:meth:`LoadedRun.rows_at`), so every claim's number is the same as from the whole
  table, up to float rounding of the means.
* Several long runs are loaded in parallel (``LOAD_WORKERS`` processes).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlab.report.errors import ReportError
from gradlab.report.summary import RunSummary, empty_rows, scan, summarise, tail_of
from gradlab.runs import RunError, find_runs, read_metrics, read_run_json

__all__ = ["REPORT_METRICS", "TAIL_FRACTION", "EARLY_FRACTION", "EARLY_METRICS", "MAX_POINTS",
           "LOAD_WORKERS", "LoadedRun", "RunSummary", "RunSet", "load_runs"]

#: Metrics the claims and figures use; the rest of a run's table is never read.
REPORT_METRICS = ("loss", "accuracy", "test_loss", "test_accuracy", "grad_norm", "weight_norm",
                  "response_std", "response_grad_norm", "residual_ratio", "identity_gap")

#: "Final" values are means over the last 10% of logged steps (step 0 excluded), so one noisy
#: batch does not decide a claim.
TAIL_FRACTION = 0.1

#: Gradient-flow is measured over the first 10% of training (steps <= 0.1 x the last step).
EARLY_FRACTION = 0.1

#: Metrics whose rows over the first ``EARLY_FRACTION`` of training are kept exactly in a summary.
EARLY_METRICS = ("response_grad_norm",)

#: Runs with more distinct logged steps than this are summarised into this many step bins (it
#: is also the most points a curve in a figure is drawn with).
MAX_POINTS = 2000

#: Processes that load long runs side by side (bounded: each holds one run's part at a time).
LOAD_WORKERS = 2

#: Below this many bytes of Parquet in all, runs are loaded one after the other in this process
#: (starting workers would cost more than it saves).
PARALLEL_MIN_BYTES = 64 * 2**20

_MODEL_RE = re.compile(r"^(?P<family>[A-Za-z_]+?)(?P<depth>\d+)$")


@dataclass
class LoadedRun:
    """One run as the report sees it: identity from ``run.json`` and its metric tables.

    Attributes:
        path: the run directory.
        info: ``run.json`` as read.
        family: model family (``plain``, ``resnet``, ...).
        depth: number of weighted layers (20, 56, ...).
        residual: whether the model has shortcuts; ``plain`` nets are the non-residual twins.
        variant: shortcut option of residual nets ("A" or "B"); "" for plain nets.
        dataset: dataset name; claims never compare across datasets.
        seed: training seed; seeds are the independent replicates of a model.
        tables: metric name -> long table ``step, layer, depth, value`` (layer categorical) of
            exact rows: every row of the metric, or, for a summarised run, the model-wide
            scalars whole and only the kept steps of per-layer metrics (see ``summary``).
        summary: for a long run, what stands in for the rows not kept (None: every row is).
    """

    path: Path
    info: dict[str, Any]
    family: str
    depth: int
    residual: bool
    variant: str
    dataset: str
    seed: int | None
    tables: dict[str, pd.DataFrame] = field(repr=False)
    summary: RunSummary | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.info.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def model(self) -> str:
        """Model label used for grouping and in tables, e.g. ``resnet56`` or ``resnet56-B``."""
        label = f"{self.family}{self.depth}"
        return f"{label}-{self.variant}" if self.variant not in ("", "A") else label

    @property
    def failure(self) -> dict[str, Any] | None:
        f = self.info.get("failure")
        return f if isinstance(f, dict) else None

    @property
    def summarised(self) -> bool:
        """Whether per-layer series are held as step bins (a long run) rather than every row."""
        return self.summary is not None

    @property
    def metrics(self) -> list[str]:
        """Names of the metrics the run logged (of those read)."""
        names = list(self.tables)
        if self.summary is not None:
            names += [m for m in self.summary.layer_steps if m not in self.tables]
        return names

    def has(self, name: str) -> bool:
        """Whether the run logged ``name`` at all."""
        return name in self.tables or (self.summary is not None
                                       and name in self.summary.layer_steps)

    def metric(self, name: str) -> pd.DataFrame:
        """Rows of one metric (empty frame when the run did not log it).

        For a summarised run, per-layer rows are the ``MAX_POINTS`` step bins: ``step`` is the
        mean step of the bin's rows and ``value`` their mean (see :meth:`RunSummary.binned`).
        """
        if self.summary is not None and name in self.summary.layer_steps:
            binned = self.summary.binned(name)[["step", "layer", "depth", "value"]]
            wide = self.tables.get(name)
            if wide is not None:
                wide = wide[wide["layer"] == ""]
                if len(wide):
                    binned = pd.concat([wide, binned], ignore_index=True)
            return binned
        t = self.tables.get(name)
        if t is None:
            return empty_rows()
        return t

    def steps(self, name: str) -> np.ndarray:
        """The distinct steps at which ``name`` was logged, sorted (exact, summarised or not)."""
        found = []
        t = self.tables.get(name)
        summarised = self.summary is not None and name in self.summary.layer_steps
        if t is not None:
            # a summary keeps only some per-layer rows; its layer_steps has all their steps
            found.append(np.unique((t[t["layer"] == ""] if summarised else t)["step"]
                                   .to_numpy()))
        if summarised:
            found.append(self.summary.layer_steps[name])
        if not found:
            return np.zeros(0, dtype=np.int64)
        return found[0] if len(found) == 1 else np.union1d(*found)

    def rows_at(self, name: str, steps: Sequence[int]) -> pd.DataFrame:
        """Exact rows ``step, layer, depth, value`` of ``name`` at the given steps.

        Rows come in the order of :attr:`tables` (by step, then forward depth). A summarised run
        answers from the rows it kept, or reads the missing steps back from its parts.
        """
        steps = [int(s) for s in steps]
        t = self.tables.get(name)
        if self.summary is not None and name in self.summary.layer_steps \
                and not self.summary.kept(name, steps):
            return self.summary.read_rows(name, steps)
        if t is None:
            return empty_rows()
        return t[t["step"].isin(steps)]

    def scalar(self, name: str) -> pd.Series:
        """A model-wide metric (layer "") as a Series indexed by step, sorted."""
        t = self.tables.get(name)
        if t is None:
            t = empty_rows()
        t = t[t["layer"] == ""]
        return pd.Series(t["value"].to_numpy(), index=t["step"].to_numpy(), name=name).sort_index()

    @property
    def logged_steps(self) -> int:
        """Number of logged training steps after initialization (step 0 is not training)."""
        s = self.scalar("loss")
        if len(s):
            steps = s.index
        elif self.tables or self.summary is not None:
            steps = np.unique(np.concatenate([self.steps(m) for m in self.metrics] or [[]]))
        else:
            steps = []
        return int((np.asarray(steps) > 0).sum())

    def tail_steps(self, name: str, fraction: float = TAIL_FRACTION) -> np.ndarray:
        """The last ``fraction`` of a metric's logged steps after step 0 (at least one)."""
        return tail_of(self.steps(name), fraction)

    def _scalar_tail(self, name: str, fraction: float) -> np.ndarray:
        s = self.scalar(name)
        s = s[s.index > 0]
        k = max(1, math.ceil(fraction * len(s)))
        return s.to_numpy(dtype=float)[-k:] if len(s) else np.zeros(0)

    def final_scalar(self, name: str, fraction: float = TAIL_FRACTION) -> float:
        """Mean of a model-wide metric over its last ``fraction`` of logged steps, leaving out
        values that are not finite (a step skipped by ``--on-nonfinite skip`` logs them; see
        :meth:`tail_nonfinite`); NaN if none is left."""
        tail = self._scalar_tail(name, fraction)
        tail = tail[np.isfinite(tail)]
        return float(tail.mean()) if len(tail) else float("nan")

    def tail_nonfinite(self, name: str, fraction: float = TAIL_FRACTION) -> int:
        """How many values of ``name`` in its last ``fraction`` of logged steps are not finite:
        those :meth:`final_scalar` and :meth:`final_layers` leave out."""
        tail = self._scalar_tail(name, fraction)
        n = int((~np.isfinite(tail)).sum())
        layers = self.final_layers(name, fraction)
        return n + int(layers["nonfinite"].sum()) if len(layers) else n

    def final_layers(self, name: str, fraction: float = TAIL_FRACTION) -> pd.DataFrame:
        """Per layer, the mean of a metric over its last ``fraction`` of logged steps, leaving
        out values that are not finite.

        Returns a frame ``layer, depth, value, nonfinite`` (how many values were left out) sorted
        by depth (forward order); ``value`` is NaN for a layer with no finite value.
        """
        if self.summary is not None and fraction == TAIL_FRACTION \
                and name in self.summary.tail:
            return self.summary.tail[name].copy()
        t = self.rows_at(name, self.tail_steps(name, fraction))
        return _per_layer(t[t["layer"] != ""])

    def layers_at(self, name: str, step: int | None) -> pd.DataFrame:
        """Per layer ``layer, depth, value`` at one logged step (``None``: the last one)."""
        if step is None:
            if self.summary is not None and name in self.summary.layer_steps:
                step = int(self.summary.layer_steps[name][-1])
            else:
                t = self.metric(name)
                t = t[t["layer"] != ""]
                if t.empty:
                    return _per_layer(t)
                step = int(t["step"].max())
        t = self.rows_at(name, [step])
        return _per_layer(t[t["layer"] != ""])

    def layers_over(self, name: str, steps: Sequence[int]) -> pd.DataFrame:
        """Per layer, the mean of a metric over the given logged steps."""
        t = self.rows_at(name, steps)
        return _per_layer(t[t["layer"] != ""])


def _per_layer(t: pd.DataFrame) -> pd.DataFrame:
    """Per layer ``layer, depth, value, nonfinite``: the mean of its finite values and how many
    were not finite (left out)."""
    if t.empty:
        return pd.DataFrame({"layer": pd.Series(dtype=str), "depth": pd.Series(dtype="int64"),
                             "value": pd.Series(dtype="float64"),
                             "nonfinite": pd.Series(dtype="int64")})
    v = t["value"].to_numpy(dtype=float)
    finite = np.isfinite(v)
    g = (t.assign(layer=t["layer"].astype(str), value=np.where(finite, v, np.nan),
                  nonfinite=~finite)
         .groupby("layer", sort=False)
         .agg(depth=("depth", "first"), value=("value", "mean"), nonfinite=("nonfinite", "sum"))
         .reset_index())
    return g.sort_values("depth", kind="stable", ignore_index=True)


@dataclass
class RunSet:
    """The runs of a report, and the ones that could not be used (with why)."""

    runs: list[LoadedRun]
    skipped: list[tuple[str, str]]

    @property
    def datasets(self) -> list[str]:
        return sorted({r.dataset for r in self.runs})

    def by_dataset(self) -> dict[str, list[LoadedRun]]:
        """Runs grouped by dataset: claims are tested within each dataset separately."""
        return {d: [r for r in self.runs if r.dataset == d] for d in self.datasets}

    def models(self) -> dict[tuple[str, str], list[LoadedRun]]:
        """Runs grouped by (dataset, model label), seeds sorted."""
        out: dict[tuple[str, str], list[LoadedRun]] = {}
        for r in sorted(self.runs, key=_order):
            out.setdefault((r.dataset, r.model), []).append(r)
        return out


def _order(r: LoadedRun) -> tuple:
    return (r.dataset, r.residual, r.family, r.depth, r.variant,
            r.seed if r.seed is not None else -1, r.name)


def _identity(info: dict[str, Any]) -> tuple[str, int, bool, str]:
    """(family, depth, residual, variant) from run.json; raises ValueError when unknown."""
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    name = str(model.get("name") or cfg.get("model") or "")
    m = _MODEL_RE.match(name)
    family = model.get("family") or (m.group("family") if m else None)
    depth = model.get("depth") or (int(m.group("depth")) if m else None)
    if not family or depth is None:
        raise ValueError(f"cannot tell the model's family and depth (model {name!r})")
    family = str(family)
    residual = model.get("residual")
    residual = bool(residual) if residual is not None else family != "plain"
    variant = ""
    if residual:
        variant = str(model.get("shortcut") or cfg.get("shortcut") or "A")
    return family, int(depth), residual, variant


def _dataset(info: dict[str, Any]) -> str:
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    return str(data.get("name") or cfg.get("dataset") or "unknown")


def _seed(info: dict[str, Any]) -> int | None:
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    seed = info.get("seed", cfg.get("seed"))
    try:
        return int(seed) if seed is not None else None
    except (TypeError, ValueError):
        return None


def _split_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    # One frame per metric, so claims and figures never re-filter a long table; layer as a
    # categorical keeps a long run's repeated layer names cheap.
    if isinstance(df["layer"].dtype, pd.CategoricalDtype):
        # read as Parquet dictionaries: the same categories as from strings (observed, sorted)
        layer = df["layer"].cat.remove_unused_categories()
        df = df.assign(layer=layer.cat.reorder_categories(sorted(layer.cat.categories)))
    else:
        df = df.astype({"layer": "category"})
    out = {}
    for metric, t in df.groupby("metric", observed=True, sort=False):
        out[str(metric)] = t.drop(columns="metric").sort_values(["step", "depth"],
                                                                ignore_index=True)
    return out


def load_run_for_report(path: Path, metrics: Sequence[str] = REPORT_METRICS,
                        max_points: int | None = None) -> LoadedRun:
    """Load one run directory (only ``metrics``); raises ValueError/RunError with the reason.

    A run of more than ``MAX_POINTS`` distinct logged steps is summarised while it is read (see
    the module docstring); a shorter one, or one whose parts' steps interleave (parts copied
    together by hand: ``gradlab`` itself trims a resumed run's parts to its checkpoint), is read
    whole. ``max_points`` overrides ``MAX_POINTS``.
    """
    max_points = MAX_POINTS if max_points is None else max_points
    info = read_run_json(path)
    family, depth, residual, variant = _identity(info)
    mdir = Path(path) / "metrics"
    files = sorted(mdir.glob("part-*.parquet")) if mdir.is_dir() else []
    if not files:
        raise RunError("no metrics (no Parquet parts under metrics/)")
    parts = [p for p in scan(files) if len(p.steps)]
    distinct = np.unique(np.concatenate([p.steps for p in parts])) if parts else []
    ordered = all(a.hi <= b.lo for a, b in zip(parts, parts[1:], strict=False))
    summary = None
    if ordered and len(distinct) > max_points:
        tables, summary = summarise(parts, metrics, max_points=max_points,
                                    tail_fraction=TAIL_FRACTION,
                                    early_fraction=EARLY_FRACTION, early_metrics=EARLY_METRICS)
    else:
        tables = {}
        df = read_metrics(path, metrics=list(metrics), categorical=True)
        if not df.empty:
            tables = _split_tables(df)
    if not tables and (summary is None or not summary.layer_steps):
        raise RunError(f"no metrics (the parts hold none of {', '.join(metrics)})")
    return LoadedRun(path=Path(path), info=info, family=family, depth=depth, residual=residual,
                     variant=variant, dataset=_dataset(info), seed=_seed(info),
                     tables=tables, summary=summary)


def _load_or_reason(path: Path, metrics: Sequence[str], max_points: int) -> LoadedRun | str:
    """A loaded run, or why it cannot be used (one line, without the path)."""
    try:
        return load_run_for_report(path, metrics, max_points)
    except (RunError, ValueError) as e:
        # RunError messages start with the path already; keep only the reason.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return reason.removeprefix(f"{path}: ").removeprefix(f"{path}/")


def _load_all(paths: Sequence[Path], metrics: Sequence[str]) -> list[LoadedRun | str]:
    """Load runs, side by side in ``LOAD_WORKERS`` processes when there is much to read.

    Each worker is a fresh interpreter (:mod:`gradlab.report._load_worker`) given a share of the
    runs, balanced by bytes on disk; it holds one part of one run at a time, so memory stays
    bounded. Should a worker fail (it cannot start, or is killed), its runs are loaded here.
    """
    sizes = [sum(f.stat().st_size for f in (p / "metrics").glob("part-*.parquet"))
             for p in paths]
    workers = min(LOAD_WORKERS, len(paths), os.cpu_count() or 1)
    if workers < 2 or sum(sizes) < PARALLEL_MIN_BYTES:
        return [_load_or_reason(p, metrics, MAX_POINTS) for p in paths]
    import pickle
    import subprocess
    import sys
    import tempfile
    import warnings

    shares: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(paths)), key=lambda i: -sizes[i]):  # largest first, to the
        w = load.index(min(load))                                 # least loaded worker
        shares[w].append(i)
        load[w] += sizes[i]
    out: list[LoadedRun | str | None] = [None] * len(paths)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryDirectory(prefix="gradlab-load-") as tmp:
        procs = []
        for w, share in enumerate(shares):
            job, result = Path(tmp) / f"job-{w}.pkl", Path(tmp) / f"result-{w}.pkl"
            job.write_bytes(pickle.dumps(([paths[i] for i in share], tuple(metrics),
                                          MAX_POINTS)))
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gradlab.report._load_worker", str(job), str(result)],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
            except OSError:
                proc = None
            procs.append((share, proc, result))
        for share, proc, result in procs:
            err = proc.communicate()[1] if proc is not None else b"could not start"
            if proc is not None and proc.returncode == 0 and result.exists():
                for i, r in zip(share, pickle.loads(result.read_bytes()), strict=True):
                    out[i] = r
                continue
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["killed"]
            warnings.warn(f"a report load worker failed ({last[0]}); loading its runs here",
                          RuntimeWarning, stacklevel=3)
            for i in share:
                out[i] = _load_or_reason(paths[i], metrics, MAX_POINTS)
    return out  # type: ignore[return-value]


def _status_rank(r: LoadedRun) -> tuple:
    # Prefer a completed run, then the one updated last.
    return (r.status == "completed", str(r.info.get("updated") or ""), r.name)


def load_runs(paths: Iterable[str | Path],
              metrics: Sequence[str] = REPORT_METRICS) -> RunSet:
    """Load run directories, or folders of them, for a report.

    Args:
        paths: run directories and/or folders whose children are run directories.
        metrics: the metric names to read (others are never read from disk).

    Returns:
        The usable runs and the skipped ones as ``(path, reason)``.

    Raises:
        ReportError: a path does not exist, or no usable run was found.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportError("no run directories given")
    for p in paths:
        if not p.exists():
            raise ReportError(f"{p}: no such directory")
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory")
    found = list(dict.fromkeys(p.resolve() for p in find_runs(paths)))
    if not found:
        raise ReportError(f"no gradlab runs (directories with run.json) in "
                          f"{', '.join(str(p) for p in paths)}")
    runs: list[LoadedRun] = []
    skipped: list[tuple[str, str]] = []
    for p, r in zip(found, _load_all(found, metrics), strict=True):
        if isinstance(r, str):
            skipped.append((str(p), r))
        else:
            runs.append(r)
    runs = _drop_duplicates(runs, skipped)
    if not runs:
        listed = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise ReportError(f"no usable runs: {len(skipped)} skipped ({listed}{more})")
    return RunSet(sorted(runs, key=_order), skipped)


#: Configuration that defines an experiment, beyond the model and the seed: runs that differ in
#: any of these are different experiments (never duplicates, never pooled as seeds). Not here:
#: where data and outputs live, logging and checkpoint intervals, the device and its fast path
#: (bf16, channels_last, compile), and what to do on a non-finite value.
SETUP_KEYS = ("dataset", "steps", "epochs", "batch_size", "lr", "momentum", "weight_decay",
              "milestones", "lr_decay", "warmup_steps", "warmup_lr", "zero_init_residual",
              "augment")


def setup_of(run: LoadedRun) -> tuple:
    """The run's training setup (:data:`SETUP_KEYS` present in its config), hashable; numbers
    compared as numbers (lr 1 is lr 1.0)."""
    cfg = run.config

    def norm(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return repr(float(v))
        if isinstance(v, list):
            return repr([float(x) if isinstance(x, (int, float)) and not isinstance(x, bool)
                         else x for x in v])
        return repr(v)

    return tuple((k, norm(cfg[k])) for k in SETUP_KEYS if k in cfg)


def main_setup(runs: Sequence[LoadedRun]) -> tuple | None:
    """The setup most of ``runs`` share (ties: the first run's); None for no runs."""
    setups = Counter(setup_of(r) for r in runs)  # (in first-seen order: max keeps the first)
    return max(setups, key=setups.__getitem__) if setups else None


def setup_difference(a: tuple, b: tuple) -> str:
    """How two setups differ, e.g. ``lr 0.05 vs 0.1``."""
    da, db = dict(a), dict(b)
    keys = [k for k in SETUP_KEYS if da.get(k) != db.get(k)]
    return ", ".join(f"{k} {da.get(k, 'unset')} vs {db.get(k, 'unset')}" for k in keys)


def _drop_duplicates(runs: list[LoadedRun], skipped: list[tuple[str, str]]) -> list[LoadedRun]:
    keyed: dict[tuple, list[LoadedRun]] = {}
    for r in runs:
        # A run without a seed cannot be told apart from another; it is never a duplicate. Nor
        # is a run of another setup (another lr, length, ...): a different experiment.
        key = (r.dataset, r.model, r.seed if r.seed is not None else f"?{r.path}", setup_of(r))
        keyed.setdefault(key, []).append(r)
    keep = []
    for (_, model, seed, _), group in keyed.items():
        group.sort(key=_status_rank, reverse=True)
        keep.append(group[0])
        for r in group[1:]:
            skipped.append((str(r.path), f"duplicate of {group[0].name} (same model {model}, "
                                         f"dataset, seed {seed} and setup); counted once"))
    return keep


def seeds_by_model(runs: Iterable[LoadedRun]) -> dict[str, list[int | None]]:
    """Model label -> its seeds (sorted), for reasons like "only one seed per model"."""
    c: dict[str, list] = {}
    for r in sorted(runs, key=_order):
        c.setdefault(r.model, []).append(r.seed)
    return c


def status_counts(runs: Iterable[LoadedRun]) -> Counter:
    return Counter(r.status for r in runs)
