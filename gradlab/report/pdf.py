"""``report.pdf`` with reportlab's platypus: verdicts first, then figures, method and runs.

The PDF uses reportlab's standard Helvetica, so its text is extractable and searchable without
embedding fonts. Those fonts cover Latin-1 only; other characters are transliterated where a
plain equivalent exists (">=" for the sign, "alpha" for the letter) and otherwise shown as "?",
rather than silently dropped. Every piece of text goes through ``xml.sax.saxutils.escape``
before it reaches a ``Paragraph``, whose mini-markup would otherwise interpret run names.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.platypus import (
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

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

__all__ = ["render_pdf", "plain_text"]

_VERDICT_BG = {"supported": colors.HexColor("#d4f0e6"), "contradicted": colors.HexColor("#fbe1d3"),
               "inconclusive": colors.HexColor("#eeeeee")}
# part, role, test, statistic, p_claimed, p_opposite, effect_name, effect, ci_low, ci_high, n
_TEST_WIDTHS = (0.15, 0.06, 0.2, 0.06, 0.07, 0.07, 0.17, 0.06, 0.06, 0.06, 0.04)
_TRANSLIT = {"\u2265": ">=", "\u2264": "<=", "\u2212": "-", "\u2013": "-", "\u2014": "-",
             "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
             "\u03b1": "alpha", "\u03c1": "rho", "\u2192": "->", "\u2248": "~"}


def plain_text(s: object) -> str:
    """Text the standard PDF fonts can show: transliterated, then Latin-1 with "?" for the rest."""
    s = str(s)
    for k, v in _TRANSLIT.items():
        s = s.replace(k, v)
    return s.encode("latin-1", "replace").decode("latin-1")


def _p(text: object, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(plain_text(text)), style)


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=base["BodyText"], fontName="Helvetica", fontSize=9,
                          leading=11.5)
    return {
        "title": ParagraphStyle("title", parent=base["Title"], fontName="Helvetica-Bold",
                                fontSize=18, leading=22),
        "h1": ParagraphStyle("h1", parent=base["Heading1"], fontName="Helvetica-Bold",
                             fontSize=14, leading=17, spaceBefore=10),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontName="Helvetica-Bold",
                             fontSize=11, leading=14, spaceBefore=8),
        "body": body,
        "small": ParagraphStyle("small", parent=body, fontSize=8, leading=10),
        "cell": ParagraphStyle("cell", parent=body, fontSize=7, leading=8.5),
        "head": ParagraphStyle("head", parent=body, fontName="Helvetica-Bold", fontSize=7,
                               leading=8.5),
    }


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]], st: dict,
           widths: Sequence[float] | None, *, verdict_col: int | None = None) -> Table:
    data = [[_p(c, st["head"]) for c in columns]]
    data += [[_p(v, st["cell"]) for v in r] for r in rows]
    t = Table(data, colWidths=widths, repeatRows=1, hAlign="LEFT")
    style = [("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
             ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
             ("VALIGN", (0, 0), (-1, -1), "TOP"),
             ("LEFTPADDING", (0, 0), (-1, -1), 3), ("RIGHTPADDING", (0, 0), (-1, -1), 3)]
    if verdict_col is not None:
        for i, r in enumerate(rows, start=1):
            bg = _VERDICT_BG.get(str(r[verdict_col]))
            if bg is not None:
                style.append(("BACKGROUND", (verdict_col, i), (verdict_col, i), bg))
    t.setStyle(TableStyle(style))
    return t


def _png_size(png: bytes) -> tuple[int, int]:
    # The IHDR chunk always comes first: width and height are big-endian uint32 at 16..24.
    w, h = struct.unpack(">II", png[16:24])
    return w, h


def render_pdf(claims: Sequence[ClaimResult], runset: RunSet,
               figures: Sequence[tuple[str, str, bytes]], *, title: str, generated: str,
               version: str) -> bytes:
    """The report as PDF bytes: title, verdict table, figures, claims, method, runs."""
    st = _styles()
    buf = io.BytesIO()
    page = landscape(A4)
    margin = 1.3 * cm
    doc = SimpleDocTemplate(buf, pagesize=page, leftMargin=margin, rightMargin=margin,
                            topMargin=margin, bottomMargin=margin, title=plain_text(title),
                            author="gradlab", subject="gradlab report")
    width = page[0] - 2 * margin
    story: list = [
        _p(title, st["title"]),
        _p(f"Generated {generated} by gradlab {version} from {len(runset.runs)} run(s) on "
           f"{', '.join(runset.datasets)}; {len(runset.skipped)} skipped. alpha = {C.ALPHA}; "
           "95% CIs are those of each test's own model (Student's t, Welch's t): one that "
           "excludes no effect means a one-sided p below 0.025, a p of 0.05 or more one that "
           "includes it; the descriptive pooled medians' are percentile bootstrap intervals "
           f"({C.N_BOOT:,} resamples, RNG seed {C.BOOT_SEED}). Pairs or runs of several depths "
           "are tested stratified by depth, each depth also alone. Non-finite values are left "
           "out of means over steps, and named in the notes.", st["small"]),
        _p("Verdicts", st["h1"]),
    ]
    vrows = verdict_rows(claims)
    fr = [0.09, 0.06, 0.08, 0.15, 0.06, 0.06, 0.2, 0.04, 0.26]
    story.append(_table(VERDICT_COLUMNS, [[r[c] for c in VERDICT_COLUMNS] for r in vrows], st,
                        [f * width for f in fr], verdict_col=2))

    story += [PageBreak(), _p("Figures", st["h1"])]
    for i, (name, caption, png) in enumerate(figures, start=1):
        w, h = _png_size(png)
        # Two wide figures (with captions) to a landscape page: at most 58% of the text width and
        # 42% of its height, about the figure's own size at 110 dpi. Tall figures (2x2 panels, the
        # heatmap) would be too small that way and get most of a page.
        frac = 0.42 if h / w < 0.6 else 0.8
        scale = min((0.58 if frac < 0.5 else 1.0) * width / w, frac * (page[1] - 2 * margin) / h)
        story.append(KeepTogether([
            Image(io.BytesIO(png), width=w * scale, height=h * scale, hAlign="LEFT"),
            _p(f"Figure {i} ({name}). {caption}", st["small"]), Spacer(1, 8)]))
    if not figures:
        story.append(_p("No figures (the runs hold none of the metrics they draw).", st["body"]))

    story += [PageBreak(), _p("Claims and method", st["h1"]),
              _p("Each claim is tested within one dataset on completed runs with at least "
                 f"{C.MIN_LOGGED_STEPS} logged steps after step 0 and models with at least "
                 f"{C.MIN_SEEDS} seeds. The unit of replication is the training run: layers of "
                 "one run are summarised into one number before a test. One-sided tests in the "
                 f"claim's direction at alpha = {C.ALPHA}: supported if significant, "
                 "contradicted if the opposite direction is (Holm-corrected over a claim's "
                 "parts), inconclusive otherwise. Two-part claims need both parts.",
                 st["body"])]
    for c in claims:
        block = [_p(f"{c.id}{f' ({c.dataset})' if c.dataset else ''}: {c.title} - "
                    f"{c.verdict}", st["h2"]),
                 _p(f"Claim: {c.statement} Source: {c.source}.", st["body"]),
                 _p(f"Verdict: {c.verdict}: {c.reason}", st["body"]),
                 _p(f"Method: {c.method}", st["small"])]
        cols, rows, _ = frame_rows(c.tests)
        if rows:
            fr = _TEST_WIDTHS if len(cols) == len(_TEST_WIDTHS) else [1 / len(cols)] * len(cols)
            block += [Spacer(1, 4), _table(cols, rows, st, [f * width for f in fr])]
        for note in c.notes:
            block.append(_p(f"Note: {note}", st["small"]))
        story += block

    story += [PageBreak(), _p("Runs", st["h1"])]
    rr = run_rows(runset.runs)
    fr = [0.11, 0.07, 0.06, 0.04, 0.07, 0.05, 0.05, 0.05, 0.05, 0.06, 0.05, 0.06, 0.09, 0.06,
          0.09]
    story.append(_table(RUN_COLUMNS, [[r[c] for c in RUN_COLUMNS] for r in rr], st,
                        [f * width for f in fr]))
    story.append(_p("Runs that did not complete", st["h2"]))
    failed = failed_rows(runset.runs)
    if failed:
        cols = ("run", "status", "reason", "step", "layer")
        story.append(_table(cols, [[r[c] for c in cols] for r in failed], st,
                            [f * width for f in (0.2, 0.1, 0.45, 0.08, 0.17)]))
        story.append(_p("Claims use completed runs only.", st["small"]))
    else:
        story.append(_p("None: every run completed.", st["body"]))
    story.append(_p("Skipped runs", st["h2"]))
    if runset.skipped:
        story.append(_table(("path", "reason"), list(runset.skipped), st,
                            [0.45 * width, 0.55 * width]))
    else:
        story.append(_p("None.", st["body"]))
    doc.build(story)
    return buf.getvalue()
