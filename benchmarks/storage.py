"""Storage: bytes per logged value in a run's metrics/ Parquet parts and tb/ event files.

Two runs, every step logged:

* a real short run, trained by gradlab itself (``gradlab.training.train``: resnet20 on digits,
  200 steps, ``every=1``, TensorBoard on);
* the synthetic large run of benchmarks/report_scale.py (resnet110's real layers and metric set,
  100k steps, Parquet parts of 1000 steps; reused from its ``--workdir`` when already written).
  Its TensorBoard side is measured by replaying the first ``--tb-steps`` logged steps through
  gradlab's :class:`~gradlab.dashboard.Dashboard` (the per-value cost does not change with length).

A "value" is one row of the long table (step, layer, depth, metric, value). Bytes per value is
total bytes on disk / rows; the Parquet figure is also split by column (compressed column chunk
sizes from the Parquet footers), and the event-file figure includes what TensorBoard stores
besides scalars (per-step histograms across layers, depth-profile images, hparams).

    python benchmarks/storage.py                 # 200-step real run, 100k-step synthetic run
    python benchmarks/storage.py --quick         # 50-step real run, 10k-step synthetic run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from gradlab.runs import METRICS_SCHEMA


def _report_scale():
    """benchmarks/report_scale.py as a module (benchmarks/ is a folder of scripts)."""
    name = "gradlab_bench_report_scale"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(
            "report_scale.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def parquet_sizes(metrics_dir: Path) -> tuple[int, int, dict[str, int]]:
    """(rows, bytes on disk, compressed bytes per column) of a run's metric parts."""
    rows, size, per_col = 0, 0, dict.fromkeys(METRICS_SCHEMA.names, 0)
    for part in sorted(Path(metrics_dir).glob("part-*.parquet")):
        size += part.stat().st_size
        md = pq.ParquetFile(part).metadata
        rows += md.num_rows
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                per_col[col.path_in_schema] += col.total_compressed_size
    return rows, size, per_col


def tb_bytes(tb_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(tb_dir).rglob("events.out.tfevents.*"))


def real_run(steps: int, tmp: Path, model: str = "resnet20", dataset: str = "digits") -> dict:
    """Train a short run with gradlab (every step logged) and measure its run directory."""
    import torch

    from gradlab.config import TrainConfig
    from gradlab.training import train

    cfg = TrainConfig(model=model, dataset=dataset, steps=steps, every=1, device="cpu",
                      batch_size=128)
    t0 = time.perf_counter()
    res = train(cfg, out=tmp, name="real", dashboard=True)
    rows, size, per_col = parquet_sizes(res.run_dir / "metrics")
    return {"name": f"{model} {dataset}, {steps} steps (gradlab train, threads "
                    f"{torch.get_num_threads()}, {time.perf_counter() - t0:.0f} s)",
            "steps": steps, "rows": rows, "parquet": size, "per_col": per_col,
            "tb": tb_bytes(res.run_dir / "tb"), "tb_rows": rows, "parts": len(list(
                (res.run_dir / "metrics").glob("part-*.parquet")))}


def replay_tensorboard(run: Path, steps: int, out: Path) -> tuple[int, int]:
    """Write the first ``steps`` logged steps of ``run`` through gradlab's Dashboard; returns
    (rows replayed, event-file bytes)."""
    import json

    from gradlab.dashboard import Dashboard

    info = json.loads((run / "run.json").read_text())
    dash = Dashboard(out, info)
    rows = 0
    for part in sorted((run / "metrics").glob("part-*.parquet")):
        t = pq.read_table(part)
        step = t["step"].to_numpy()
        cols = {"layer": t["layer"].to_numpy(zero_copy_only=False).astype(object),
                "depth": t["depth"].to_numpy(),
                "metric": t["metric"].to_numpy(zero_copy_only=False).astype(object),
                "value": t["value"].to_numpy()}
        # A part holds whole steps in order (plus the evaluation rows of a step): cut at changes.
        cuts = np.flatnonzero(np.diff(step)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(step)], strict=True):
            if step[lo] >= steps:
                break
            dash.log(int(step[lo]), {k: v[lo:hi] for k, v in cols.items()})
            rows += hi - lo
        if step[-1] >= steps:
            break
    dash.close()
    return rows, tb_bytes(out)


def synthetic_run(steps: int, part_steps: int, workdir: Path, tb_steps: int, tmp: Path,
                  model: str = "resnet110") -> dict:
    rs = _report_scale()
    run = rs.generate(workdir, [model], [0], steps, part_steps, log=lambda *a, **k: None)[0]
    rows, size, per_col = parquet_sizes(run / "metrics")
    tb_rows, tb = replay_tensorboard(run, min(tb_steps, steps), tmp / "tb-replay")
    return {"name": f"{model} synthetic, {steps} steps (report_scale; TensorBoard: first "
                    f"{min(tb_steps, steps)} steps replayed)",
            "steps": steps, "rows": rows, "parquet": size, "per_col": per_col, "tb": tb,
            "tb_rows": tb_rows, "parts": len(list((run / "metrics").glob("part-*.parquet")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-steps", type=int, default=200)
    ap.add_argument("--synthetic-steps", type=int, default=100_000)
    ap.add_argument("--part-steps", type=int, default=1000)
    ap.add_argument("--tb-steps", type=int, default=5000,
                    help="synthetic steps replayed through the TensorBoard writer")
    ap.add_argument("--workdir", type=Path,
                    default=Path(tempfile.gettempdir()) / "gradlab-report-scale",
                    help="where report_scale.py keeps its synthetic runs")
    ap.add_argument("--quick", action="store_true", help="50 real steps, 10k synthetic steps")
    a = ap.parse_args()
    real_steps, syn_steps, tb_steps = ((50, 10_000, 1000) if a.quick
                                       else (a.real_steps, a.synthetic_steps, a.tb_steps))
    with tempfile.TemporaryDirectory() as tmp:
        results = [real_run(real_steps, Path(tmp)),
                   synthetic_run(syn_steps, a.part_steps, a.workdir, tb_steps, Path(tmp))]
    cols = METRICS_SCHEMA.names
    print("bytes per logged value (one long-table row); Parquet zstd, columns from the footers")
    print(f"{'run':<72}{'rows':>12}{'parts':>7}{'Parquet B/row':>15}"
          + "".join(f"{c:>8}" for c in cols) + f"{'tb B/row':>10}")
    for r in results:
        print(f"{r['name']:<72}{r['rows']:>12,}{r['parts']:>7}{r['parquet'] / r['rows']:>15.2f}"
              + "".join(f"{r['per_col'][c] / r['rows']:>8.2f}" for c in cols)
              + f"{r['tb'] / max(r['tb_rows'], 1):>10.2f}")


if __name__ == "__main__":
    main()
