"""``report.html``: one self-contained file rendered from a jinja2 template.

Self-contained means a report can be mailed, archived or opened offline years later: CSS is
inline, figures are base64 ``data:`` URIs, and nothing is fetched (no scripts, fonts, stylesheets
or images from anywhere). Autoescaping is on for the whole template, so run names, failure
reasons and paths (all user-controlled) can never inject markup.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from gradlab.report import claims as C
from gradlab.report.claims import ClaimResult
from gradlab.report.load import RunSet
from gradlab.report.tables import (
    RUN_COLUMNS,
    VERDICT_COLUMNS,
    failed_rows,
    frame_rows,
    run_rows,
    verdict_rows,
)

__all__ = ["TEMPLATES", "render_html"]

TEMPLATES = Path(__file__).parent / "templates"


def _anchor(c: ClaimResult) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{c.id}-{c.dataset or ''}".lower()).strip("-")


def _env() -> Environment:
    # autoescape=True (not select_autoescape): the template's .j2 suffix would not match the
    # default extension list, and escaping must never depend on a file name.
    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(claims: Sequence[ClaimResult], runset: RunSet,
                figures: Sequence[tuple[str, str, bytes]], *, title: str, generated: str,
                version: str) -> str:
    """The report as one HTML string (see the module docstring for what it guarantees)."""
    verdicts = verdict_rows(claims)
    for row, c in zip(verdicts, claims, strict=True):
        row["anchor"] = _anchor(c)
    claim_ctx = []
    for c in claims:
        tcols, trows, _ = frame_rows(c.tests)
        dcols, drows, more = frame_rows(c.details)
        claim_ctx.append({"id": c.id, "dataset": c.dataset, "title": c.title,
                          "statement": c.statement, "source": c.source, "method": c.method,
                          "verdict": c.verdict, "reason": c.reason, "anchor": _anchor(c),
                          "tests_cols": tcols, "tests_rows": trows, "details_cols": dcols,
                          "details_rows": drows, "details_more": more, "notes": c.notes})
    figs = [{"name": n, "caption": cap, "data": base64.b64encode(png).decode("ascii")}
            for n, cap, png in figures]
    return _env().get_template("report.html.j2").render(
        title=title, generated=generated, version=version, n_runs=len(runset.runs),
        datasets=runset.datasets, skipped=list(runset.skipped), alpha=C.ALPHA,
        n_boot=f"{C.N_BOOT:,}", boot_seed=C.BOOT_SEED, verdict_columns=VERDICT_COLUMNS,
        verdicts=verdicts, claims=claim_ctx, figures=figs, run_columns=RUN_COLUMNS,
        runs=run_rows(runset.runs), failed=failed_rows(runset.runs))
