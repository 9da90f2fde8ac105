"""Turn run directories into evidence: claims tested with scipy, figures, HTML and PDF.

Data flows one way: :mod:`~gradlab.report.load` reads run directories (never live objects) ->
:mod:`~gradlab.report.claims` tests the published claims -> :mod:`~gradlab.report.figures` draws
them -> :mod:`~gradlab.report.html` / :mod:`~gradlab.report.pdf` write the report.

    >>> report = build_report([Path("runs")], Path("reports/near-identity"))
    >>> print(report.verdicts_markdown())

Matplotlib, jinja2 and reportlab are imported only when a report is built, so importing this
package (e.g. for :data:`CLAIMS`) stays cheap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradlab.report.claims import CLAIMS, ClaimResult, evaluate_claims
from gradlab.report.errors import ReportError
from gradlab.report.load import LoadedRun, RunSet, load_runs
from gradlab.report.tables import VERDICT_COLUMNS, markdown_table, verdict_rows

__all__ = ["CLAIMS", "FORMATS", "ReportError", "Report", "check_output", "ClaimResult", "LoadedRun",
           "build_report", "load_runs"]

FORMATS: tuple[str, ...] = ("html", "pdf")


@dataclass
class Report:
    """What :func:`build_report` produced: verdicts, the runs behind them, and the files.

    Attributes:
        claims: one result per (claim, dataset), in the order asked for.
        runs: the runs used (all statuses; claims use the completed ones).
        skipped: runs that could not be read, as ``(path, reason)``.
        html_path / pdf_path: the files written (None for a format not asked for).
        figures: ``(name, caption, PNG bytes)`` in report order.
        title: the report's title.
    """

    claims: list[ClaimResult]
    runs: list[LoadedRun]
    skipped: list[tuple[str, str]]
    html_path: Path | None = None
    pdf_path: Path | None = None
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)
    title: str = "gradlab report"

    def verdicts_markdown(self) -> str:
        """The verdict table as GitHub markdown (for TensorBoard's text tab, READMEs, CI logs)."""
        return markdown_table(verdict_rows(self.claims), VERDICT_COLUMNS)


def _check_choice(kind: str, given: Sequence[str], valid: Sequence[str]) -> None:
    for g in given:
        if g not in valid:
            close = difflib.get_close_matches(str(g), valid, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ReportError(f"unknown {kind} {g!r} (choose from {', '.join(valid)}){hint}")


def _writable_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A real write is the only reliable check (permissions, read-only mounts, ACLs).
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ReportError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None


def check_output(out_dir: str | os.PathLike, formats: Sequence[str]) -> None:
    """Raise :class:`ReportError` for an unknown format or a report folder that cannot be
    written, leaving no folder behind that was not there: for a caller that builds the report
    later (``gradlab run`` checks before it trains)."""
    _check_choice("format", formats, FORMATS)
    if not formats:
        return  # verdicts and figures only: nothing is written
    out_dir = Path(out_dir)
    created = []
    p = out_dir
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        _writable_dir(out_dir)
    finally:
        for d in created:  # deepest first; one that something else filled meanwhile stays
            with contextlib.suppress(OSError):
                d.rmdir()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary file beside ``path``, fsync, and rename it into place.

    A reader (a browser refreshing the report, a CI artifact upload) never sees half a file.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None


def _default_title(runset: RunSet) -> str:
    models = list(dict.fromkeys(r.model for r in runset.runs))
    shown = ", ".join(models[:6]) + (", ..." if len(models) > 6 else "")
    return f"gradlab report: {shown} on {', '.join(runset.datasets)}"


def build_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 formats: Sequence[str] = FORMATS, claims: Sequence[str] | None = None,
                 title: str | None = None) -> Report:
    """Read run directories, test the claims, draw the figures and write the report.

    Args:
        paths: run directories, or folders whose children are run directories.
        out_dir: where ``report.html`` / ``report.pdf`` go (created if needed).
        formats: any of ``"html"``, ``"pdf"``; empty to only compute the verdicts and figures.
        claims: claim ids to test (default: all of :data:`CLAIMS`).
        title: the report's title (default: the models and datasets).

    Returns:
        The :class:`Report`, with the paths of the files written.

    Raises:
        ReportError: unknown claim or format, unwritable ``out_dir``, or no usable runs.
    """
    formats = tuple(formats)
    ids = tuple(CLAIMS if claims is None else claims)
    _check_choice("format", formats, FORMATS)
    _check_choice("claim", ids, CLAIMS)
    out_dir = Path(out_dir)
    # Runs first: bad input must not leave an empty report folder behind.
    runset = load_runs([Path(p) for p in paths])
    if formats:
        _writable_dir(out_dir)  # before the figures, the slow part
    results = evaluate_claims(runset, ids)

    from gradlab import __version__
    from gradlab.report.figures import make_figures

    figures = make_figures(runset)
    report = Report(claims=results, runs=runset.runs, skipped=list(runset.skipped),
                    figures=figures, title=title or _default_title(runset))
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    kw = dict(title=report.title, generated=generated, version=__version__)
    if "html" in formats:
        from gradlab.report.html import render_html

        report.html_path = out_dir / "report.html"
        write_atomic(report.html_path, render_html(results, runset, figures, **kw)
                     .encode("utf-8"))
    if "pdf" in formats:
        from gradlab.report.pdf import render_pdf

        report.pdf_path = out_dir / "report.pdf"
        write_atomic(report.pdf_path, render_pdf(results, runset, figures, **kw))
    return report
