"""The report's tables as rows of plain text, shared by the HTML, PDF and markdown renderers.

Formatting lives here once, so the three outputs never disagree on a number. Values are plain
(unescaped) strings; each renderer escapes them for its own format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from gradlab.report.claims import ClaimResult
from gradlab.report.load import LoadedRun

__all__ = ["fmt", "fmt_p", "fmt_effect", "verdict_rows", "VERDICT_COLUMNS", "run_rows",
           "RUN_COLUMNS", "failed_rows", "frame_rows", "markdown_table"]

VERDICT_COLUMNS = ("claim", "dataset", "verdict", "test", "statistic", "p", "effect [95% CI]",
                   "n", "reason")
RUN_COLUMNS = ("run", "model", "dataset", "seed", "status", "steps", "batch", "lr", "every",
               "logged steps", "device", "gradlab", "torch", "python", "git commit")


def fmt(x: Any, digits: int = 4) -> str:
    """A number in ``digits`` significant digits; NaN and None as "-"."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "-"
    return f"{v:.{digits}g}"


def fmt_p(p: float) -> str:
    """p-values: three significant digits, and "< 1e-10" below that (more digits are noise)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "< 1e-10" if p < 1e-10 else f"{p:.3g}"


def fmt_effect(c: ClaimResult) -> str:
    if math.isnan(c.effect_size):
        return "-"
    ci = (f" [{fmt(c.ci_low, 3)}, {fmt(c.ci_high, 3)}]"
          if not (math.isnan(c.ci_low) or math.isnan(c.ci_high)) else "")
    return f"{fmt(c.effect_size, 3)}{ci} ({c.effect_name})"


def verdict_rows(claims: Sequence[ClaimResult]) -> list[dict[str, str]]:
    """One row per (claim, dataset): the verdict table that opens every report."""
    return [{"claim": c.id, "dataset": c.dataset or "-", "verdict": c.verdict,
             "test": c.test or "-", "statistic": fmt(c.statistic), "p": fmt_p(c.p_value),
             "effect [95% CI]": fmt_effect(c), "n": str(c.n) if c.n else "-", "reason": c.reason}
            for c in claims]


def run_rows(runs: Sequence[LoadedRun]) -> list[dict[str, str]]:
    """One row per run with its configuration, status and the versions that produced it."""
    rows = []
    for r in runs:
        cfg, ver = r.config, r.info.get("versions") or {}
        commit = r.info.get("git_commit")
        rows.append({"run": r.name, "model": r.model, "dataset": r.dataset,
                     "seed": fmt(r.seed), "status": r.status, "steps": fmt(cfg.get("steps")),
                     "batch": fmt(cfg.get("batch_size")), "lr": fmt(cfg.get("lr")),
                     "every": fmt(cfg.get("every")), "logged steps": str(r.logged_steps),
                     "device": str(r.info.get("device", "-")),
                     "gradlab": str(ver.get("gradlab", "-")), "torch": str(ver.get("torch", "-")),
                     "python": str(ver.get("python", "-")),
                     "git commit": str(commit)[:12] if commit else "-"})
    return rows


def failed_rows(runs: Sequence[LoadedRun]) -> list[dict[str, str]]:
    """Runs that did not complete, with the failure recorded in run.json."""
    rows = []
    for r in runs:
        if r.status == "completed":
            continue
        f = r.failure or {}
        rows.append({"run": r.name, "status": r.status,
                     "reason": str(f.get("reason", "-")) if f else "-",
                     "step": fmt(f.get("step")) if f else "-",
                     "layer": str(f.get("layer") or "-") if f else "-"})
    return rows


def frame_rows(df: pd.DataFrame, max_rows: int = 60) -> tuple[list[str], list[list[str]], int]:
    """(columns, formatted rows, rows left out) of a details frame, NaN cells as "-"."""
    if df is None or df.empty:
        return [], [], 0
    cols = [str(c) for c in df.columns]
    rows = [[fmt(v) for v in rec] for rec in df.head(max_rows).itertuples(index=False)]
    return cols, rows, max(0, len(df) - max_rows)


def markdown_table(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table; pipes and newlines in cells are escaped."""
    def cell(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
