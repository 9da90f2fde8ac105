"""Run directories: ``run.json``, Parquet metric parts, and :func:`load_run`.

Layout (schema_version 1)::

    runs/<name>/
      run.json       config, seed, device, versions, git commit, status, timestamps
      metrics/       part-000001.parquet, ... each written whole, then renamed into place;
                     together one long table step, layer, depth, metric, value
      tb/            TensorBoard event files
      checkpoints/   last.pt

Parts are written to a hidden temporary name (``.part-*.tmp``, which pyarrow's dataset reader
skips) and renamed, so a reader, or a run killed at any moment, only ever sees whole parts.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["SCHEMA_VERSION", "METRICS_SCHEMA", "RunError", "Run", "RunDir", "RunLock",
           "MetricWriter", "load_run", "is_run_dir", "find_runs"]

SCHEMA_VERSION = 1
STATUSES = ("running", "completed", "failed", "interrupted")
METRICS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("layer", pa.string()),
    ("depth", pa.int32()),
    ("metric", pa.string()),
    ("value", pa.float64()),
])


class RunError(ValueError):
    """A run directory that cannot be read or written; ``str(e)`` is one line for the CLI."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_safe(value):
    """``value`` with every float that is not finite replaced by None: JSON has no NaN or
    Infinity (Python writes them as bare words other parsers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable (where the system lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it, and rename it into place
    (values that are not finite are written as null)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(_json_safe(data), f, indent=2, sort_keys=False, default=str, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def git_commit() -> str | None:
    """The gradlab checkout's commit, when gradlab runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    """Versions of what produced a run: gradlab, torch, python and the platform."""
    import torch

    from gradlab import __version__

    return {"gradlab": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


class MetricWriter:
    """Buffers long-table rows on the host and writes them as whole Parquet parts."""

    def __init__(self, metrics_dir: Path, *, start_index: int | None = None):
        self.dir = metrics_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_index is None:
            start_index = max((_part_index(p) for p in self.dir.glob("part-*.parquet")),
                              default=0) + 1
        self.index = start_index
        self._chunks: list[dict[str, np.ndarray]] = []
        self.rows_buffered = 0

    def add(self, step: int, columns: dict[str, np.ndarray]) -> None:
        """Queue one logged step's rows (arrays ``layer, depth, metric, value``)."""
        n = len(columns["value"])
        if n == 0:
            return
        self._chunks.append({"step": np.full(n, step, dtype=np.int64), **columns})
        self.rows_buffered += n

    def flush(self) -> Path | None:
        """Write everything buffered as one part; returns its path (None when nothing was)."""
        if not self._chunks:
            return None
        cols = {k: np.concatenate([c[k] for c in self._chunks]) for k in METRICS_SCHEMA.names}
        table = pa.table({
            "step": pa.array(cols["step"], pa.int64()),
            "layer": pa.array(cols["layer"], pa.string()),
            "depth": pa.array(cols["depth"], pa.int32()),
            "metric": pa.array(cols["metric"], pa.string()),
            "value": pa.array(cols["value"], pa.float64()),
        }, schema=METRICS_SCHEMA)
        name = f"part-{self.index:06d}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        fsync_dir(self.dir)
        self.index += 1
        self._chunks.clear()
        self.rows_buffered = 0
        return self.dir / name


def _part_index(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


@dataclass
class RunDir:
    """A run directory being written: creates it, keeps run.json current, owns the writer."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics_dir(self) -> Path:
        return self.path / "metrics"

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def create(cls, path: Path, info: dict[str, Any], *, force: bool = False) -> RunDir:
        """Create a new run directory; an existing one is refused unless ``force``."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not force:
                raise RunError(f"run directory {path} already exists; use --resume to continue "
                               "it or --force to start it again")
            _clear_run(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            for sub in ("metrics", "tb", "checkpoints"):
                (path / sub).mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {path}: {e.strerror or e}") from None
        now = _now()
        full = {"schema_version": SCHEMA_VERSION, "name": path.name, "status": "running",
                "created": now, "updated": now, "finished": None, **info}
        run = cls(path, full)
        run.save()
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """Open an existing run directory to continue it (``--resume``)."""
        info = read_run_json(Path(path))
        return cls(Path(path), info)

    def save(self, **updates: Any) -> None:
        """Update fields of run.json and rewrite it atomically."""
        self.info.update(updates)
        self.info["updated"] = _now()
        write_json_atomic(self.path / "run.json", self.info)

    def mark(self, status: str, **extra: Any) -> None:
        """Set the run's status (running | completed | failed | interrupted)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        finished = _now() if status != "running" else None
        self.save(status=status, finished=finished, **extra)


class RunLock:
    """An exclusive lock on a run directory, held by the process that writes the run, so two
    processes (two ``gradlab run`` of one suite, a ``--resume`` beside a running job) never write
    one run at once.

    ``flock`` on the directory itself: nothing is written to take it, and the system releases it
    when the process ends, however it ends. Where there is no ``flock`` (Windows, some network
    file systems) there is no lock.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    def acquire(self, path: Path) -> None:
        """Lock ``path`` (releasing any directory held before); a directory that is not there
        is not locked. Raises :class:`RunError` when another process holds it."""
        self.release()
        try:
            import fcntl
        except ImportError:
            return
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"run directory {path} is being written by another gradlab process; "
                           "wait for it to end") from None
        except OSError:  # no flock on this file system
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _clear_run(path: Path) -> None:
    import shutil

    if not (path / "run.json").exists():
        raise RunError(f"{path} exists and is not a gradlab run directory; refusing to replace it")
    shutil.rmtree(path)


def read_run_json(path: Path) -> dict[str, Any]:
    """Read and validate ``run.json`` of a run directory."""
    f = Path(path) / "run.json"
    if not Path(path).is_dir():
        raise RunError(f"{path}: no such run directory")
    if not f.is_file():
        raise RunError(f"{path}: not a gradlab run directory (no run.json)")
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise RunError(f"{f}: unreadable run.json ({str(e)[:160]})") from None
    if not isinstance(info, dict):
        raise RunError(f"{f}: run.json is not a JSON object")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunError(f"{path}: run directory schema_version {version!r}, this gradlab reads "
                       f"{SCHEMA_VERSION}")
    return info


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run directory (has run.json)."""
    return (Path(path) / "run.json").is_file()


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Expand paths into run directories: a run itself, or a folder whose children are runs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            found.append(p)
        elif p.is_dir():
            found += sorted(c for c in p.iterdir() if is_run_dir(c))
    return found


def check_part(part: Path, table: pa.Table) -> pa.Table:
    """``table`` (read from ``part``) if its columns have the metrics schema's types (a string
    column may be read as a dictionary or be a large string); else a :class:`RunError` naming
    the part and the column."""
    for f in table.schema:
        if f.name not in METRICS_SCHEMA.names:
            raise RunError(f"{part}: not a gradlab metrics part (column {f.name!r} is not in "
                           "the schema)")
        want = METRICS_SCHEMA.field(f.name).type
        got = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        if got != want and not (pa.types.is_string(want) and pa.types.is_large_string(got)):
            raise RunError(f"{part}: not a gradlab metrics part (column {f.name!r} is {got}, "
                           f"the schema says {want})")
    return table


def read_part(part: Path, **kwargs) -> pa.Table:
    """``pq.read_table(part, **kwargs)``; a part that cannot be read is a :class:`RunError`
    naming it."""
    try:
        return pq.read_table(part, **kwargs)
    except (OSError, pa.ArrowException) as e:
        raise RunError(f"{part}: unreadable metrics part ({str(e).splitlines()[0]})") from None


def read_metrics(path: Path, *, columns: list[str] | None = None,
                 metrics: list[str] | None = None, steps: list[int] | None = None,
                 categorical: bool = False) -> pd.DataFrame:
    """Read a run's metric parts (only ``columns`` / only ``metrics`` when given).

    Reads part by part so a damaged part is named in the error rather than failing the dataset.
    A row repeated by a resumed run (same step, layer and metric) is kept once, the latest.

    Args:
        path: the run directory.
        columns: the columns to read (default: all five).
        metrics: the metric names to read (filtered while reading); default all.
        steps: the steps to read (filtered while reading); default all.
        categorical: read ``layer`` and ``metric`` as pandas categoricals straight from the
            Parquet dictionaries (no Python string per row: far less memory and time on long
            runs); the default keeps plain strings, as ``pandas.read_parquet`` gives them.
    """
    mdir = Path(path) / "metrics"
    parts = sorted(mdir.glob("part-*.parquet")) if mdir.is_dir() else []
    cols = columns or METRICS_SCHEMA.names
    filters = ([("metric", "in", list(metrics))] if metrics else []) + \
        ([("step", "in", list(steps))] if steps is not None else [])
    dictionary = [c for c in ("layer", "metric") if c in cols] if categorical else None
    tables = []
    for part in parts:
        tables.append(check_part(part, read_part(part, columns=cols, filters=filters or None,
                                                 read_dictionary=dictionary)))
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype="category" if dictionary and c in dictionary
                                          else METRICS_SCHEMA.field(c).type.to_pandas_dtype())
                             for c in cols})
    df = pa.concat_tables(tables).to_pandas()
    keys = [c for c in ("step", "layer", "metric") if c in df.columns]
    if len(keys) == 3 and len(tables) > 1:
        # Only steps that two parts both cover can repeat a row (a part is one flush of the
        # writer, whose steps are distinct); de-duplicate just those rows, not the whole table.
        at_risk = _shared_steps(df["step"].to_numpy(), [t.num_rows for t in tables])
        if at_risk.any():
            sub = df.loc[at_risk, keys]
            repeated = sub.index[sub.duplicated(keep="last").to_numpy()]
            if len(repeated):
                df = df.drop(index=repeated).reset_index(drop=True)
    return df


def _shared_steps(step: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Rows whose step lies in the step range of more than one part (the only possible repeats).

    ``step`` is the parts' rows concatenated in order, ``sizes`` the rows per part.
    """
    bounds = np.cumsum([0, *sizes])
    ranges = [(int(step[a:b].min()), int(step[a:b].max()))
              for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    ranges.sort()
    shared: list[tuple[int, int]] = []  # intersections of ranges, in order, merged
    reach = None
    for lo, hi in ranges:
        if reach is not None and lo <= reach:
            cut = (lo, min(hi, reach))
            if shared and cut[0] <= shared[-1][1]:
                shared[-1] = (shared[-1][0], max(shared[-1][1], cut[1]))
            else:
                shared.append(cut)
        reach = hi if reach is None else max(reach, hi)
    if not shared:
        return np.zeros(len(step), dtype=bool)
    starts = np.array([a for a, _ in shared])
    ends = np.array([b for _, b in shared])
    i = np.searchsorted(starts, step, side="right") - 1
    return (i >= 0) & (step <= ends[np.maximum(i, 0)])


@dataclass
class Run:
    """A run read back from disk: ``config`` (dict), ``metrics`` (long DataFrame), ``info``."""

    path: Path
    info: dict[str, Any]
    metrics: pd.DataFrame

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config", {})

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)


def load_run(path: str | os.PathLike, *, metrics: list[str] | None = None) -> Run:
    """Load a run directory: ``load_run("runs/resnet56").metrics`` is the long table."""
    path = Path(path)
    info = read_run_json(path)
    return Run(path, info, read_metrics(path, metrics=metrics))
