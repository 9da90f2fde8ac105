"""build_report end to end: self-contained HTML, extractable PDF, figures, escaping, bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pypdf import PdfReader
from synthetic_runs import CLAIM_IDS, make_run

from gradlab.report import CLAIMS, Report, ReportError, build_report
from gradlab.report.figures import MAX_POINTS, bin_series

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def built(supported_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    """The 12 planted-true runs plus a failed run with a malicious name, rendered once."""
    root = tmp_path_factory.mktemp("evil-runs")
    shutil.copytree(supported_suite, root, dirs_exist_ok=True)
    make_run(root, "plain56", 7, name=EVIL, dirname="evil", status="failed",
             failure={"reason": f"diverged {EVIL}", "step": 42, "layer": "layer2.3.bn1"})
    bare = make_run(root, "resnet20", 9)
    shutil.rmtree(bare / "metrics")
    return build_report([root], tmp_path_factory.mktemp("out") / "report")


def test_report_object(built: Report) -> None:
    assert [c.id for c in built.claims] == list(CLAIMS)
    assert all(c.verdict == "supported" for c in built.claims)  # the failed run is excluded
    assert len(built.runs) == 13
    assert [Path(p).name for p, _ in built.skipped] == ["resnet20-s9"]
    assert built.html_path.name == "report.html" and built.pdf_path.name == "report.pdf"
    leftovers = [p.name for p in built.html_path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files


def test_figures_are_pngs_with_captions(built: Report) -> None:
    names = [n for n, _, _ in built.figures]
    assert names == ["training_curves", "test_error", "response_std", "near_identity",
                     "gradient_flow", "norms", "residual_ratio_heatmap"]
    for _, caption, png in built.figures:
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(caption) > 40


def test_html_is_self_contained(built: Report) -> None:
    html = built.html_path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"<script\b", html, re.I)  # no scripts at all, inline or not
    assert not re.search(r"<link\b|@import|url\(", html, re.I)
    assert html.count('src="data:image/png;base64,') == len(built.figures)


def test_html_lists_every_claim_and_verdict(built: Report) -> None:
    html = built.html_path.read_text(encoding="utf-8")
    verdicts = html[html.index('id="verdicts"'):html.index('id="claims"')]
    for c in built.claims:
        assert c.id in verdicts
        assert re.search(rf'claim-{c.id}.*?class="verdict {c.verdict}">{c.verdict}<', verdicts,
                         re.S)


def test_html_escapes_user_text(built: Report) -> None:
    html = built.html_path.read_text(encoding="utf-8")
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "diverged &lt;script&gt;" in html  # the failure reason is listed, escaped


def test_pdf_text_has_every_claim_and_verdict(built: Report) -> None:
    reader = PdfReader(built.pdf_path)
    first = reader.pages[0].extract_text()
    assert "Verdicts" in first  # the verdict table comes first
    for c in built.claims:
        assert c.id in first and c.verdict in first
    text = "\n".join(p.extract_text() for p in reader.pages)
    for heading in ("Figures", "Claims and method", "Runs", "Runs that did not complete",
                    "Skipped runs", "no metrics"):
        assert heading in text
    assert EVIL in text  # escaped for reportlab's markup, shown literally
    assert "diverged" in text and "Welch t-test" in text


def test_verdicts_markdown(built: Report) -> None:
    md = built.verdicts_markdown().splitlines()
    assert md[0].startswith("| claim | dataset | verdict |")
    assert len(md) == 2 + len(CLAIMS)
    assert all("| supported |" in line for line in md[2:])


def test_formats_and_claim_subset(supported_suite: Path, tmp_path: Path) -> None:
    r = build_report([supported_suite], tmp_path, formats=("html",), claims=["near-identity"],
                     title=f"T {EVIL}")
    assert r.pdf_path is None and not (tmp_path / "report.pdf").exists()
    assert [c.id for c in r.claims] == ["near-identity"]
    html = r.html_path.read_text()
    assert "<title>T &lt;script&gt;" in html


def test_mixed_datasets_render_per_dataset(tmp_path: Path) -> None:
    for m in ("plain20", "resnet20"):
        for s in (0, 1):
            make_run(tmp_path / "runs", m, s, steps=100)
            make_run(tmp_path / "runs", m, s, steps=100, dataset="cifar10")
    r = build_report([tmp_path / "runs"], tmp_path / "out", formats=("html",),
                     claims=["gradient-flow"])
    assert [(c.id, c.dataset) for c in r.claims] == [("gradient-flow", "cifar10"),
                                                     ("gradient-flow", "digits")]
    names = {n for n, _, _ in r.figures}
    assert {"training_curves-cifar10", "training_curves-digits"} <= names


@pytest.mark.parametrize("kw, match", [
    ({"claims": ["degredation"]}, "unknown claim 'degredation'.*did you mean degradation"),
    ({"formats": ("html", "docx")}, "unknown format 'docx'"),
])
def test_bad_choices(supported_suite: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ReportError, match=match):
        build_report([supported_suite], tmp_path, **kw)


def test_unwritable_out_dir(supported_suite: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ReportError, match="cannot write the report to"):
        build_report([supported_suite], blocker / "report")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    with pytest.raises(ReportError, match="no gradlab runs"):
        build_report([tmp_path / "runs"], tmp_path / "out")
    assert issubclass(ReportError, ValueError)


def test_long_series_are_binned() -> None:
    steps = np.arange(100_001)
    values = np.sin(steps / 1000.0)
    b = bin_series(steps, values)
    assert len(b) == MAX_POINTS
    assert (b["min"] <= b["mean"]).all() and (b["mean"] <= b["max"]).all()
    assert b["step"].is_monotonic_increasing
    short = bin_series(steps[:50], values[:50])
    assert len(short) == 50 and np.allclose(short["mean"], values[:50])


def test_claim_ids_in_test_fixture_match() -> None:
    assert CLAIM_IDS == CLAIMS


def test_profiles_draw_completed_runs_only(tmp_path: Path, monkeypatch) -> None:
    import gradlab.report.figures as figures
    from gradlab.report import load_runs

    for s in (0, 1):
        for m in ("plain20", "resnet20"):
            make_run(tmp_path, m, s)
    make_run(tmp_path, "plain20", 2, status="failed",
             failure={"reason": "non-finite loss at step 40", "step": 40, "layer": None})
    drawn: dict[str, list[int]] = {}
    real = figures._draw_profile

    def spy(ax, prof, style, label, n, x=None):
        drawn.setdefault(label, []).append(n)
        return real(ax, prof, style, label, n, x)

    monkeypatch.setattr(figures, "_draw_profile", spy)
    figs = {name: caption for name, caption, _ in figures.make_figures(load_runs([tmp_path]))}
    assert drawn["plain20"] and set(drawn["plain20"]) == {2}  # not the failed seed 2
    assert "Completed runs only" in figs["response_std"] and "1 failed" in figs["response_std"]
    assert "including 1 failed or unfinished" in figs["training_curves"]


def test_zero_init_step_0_ratios_draw_without_a_warning(tmp_path: Path) -> None:
    import warnings

    import pyarrow.parquet as pq

    import gradlab.report.figures as figures
    from gradlab.report import load_runs

    for s in (0, 1):
        for m in ("plain20", "resnet20"):
            make_run(tmp_path, m, s)
    for s in (0, 1):  # zero-init: F(x) = 0 in every block at step 0
        part = tmp_path / f"resnet20-s{s}" / "metrics" / "part-000001.parquet"
        df = pq.read_table(part).to_pandas()
        df.loc[(df["metric"] == "residual_ratio") & (df["step"] == 0), "value"] = 0.0
        pq.write_table(pq.read_table(part).from_pandas(df, schema=pq.read_schema(part),
                                                       preserve_index=False), part)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = {n: c for n, c, _ in figures.make_figures(load_runs([tmp_path]))}
    assert "linear for a panel with no positive value" in figs["near_identity"]
