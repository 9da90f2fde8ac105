"""Report at scale: time and peak memory of ``gradlab.report.build_report`` on 100k-step runs.

Writes synthetic run directories the way a run writes them (``RunDir`` + ``MetricWriter``, one
Parquet part per ``--part-steps`` steps), every step logged, then builds the HTML + PDF report in
a child process and reads its peak resident memory (``ru_maxrss`` from ``wait4``; the parent
also polls the sum over the child and its descendants, the report's load workers, and kills them
all at ``--mem-cap-gib`` so a memory-hungry report cannot take the machine down). Targets: under
60 s and under 4 GiB.

The rows are what a real run logs: the layer names, depths and metric set come from gradlab's
own :class:`~gradlab.probing.Probe` on the real model (resnet110: 818 probe rows per step, plus
loss, accuracy, lr and images_per_s; test_loss/test_accuracy at ten evaluation steps), so
100k steps are 82 million rows per run. Values are float32 (as probes compute them) with
planted trends and noise, drawn vectorized per part. The report needs a plain counterpart and
two seeds per model before the claims test anything, so by default four runs are written:
resnet110 and plain110, seeds 0 and 1 (328 million rows). Generated runs are kept under
``--workdir`` and reused by later invocations with the same settings (benchmarks/storage.py
reuses them too); the report is given exactly the runs asked for.

With ``--profile`` (automatic when a target is missed) a second child runs build_report's
stages one by one (load, claims, figures, html, pdf) and reports each one's time and peak RSS,
and three more load one run: as gradlab does it, step by step (Parquet read, concat, to_pandas,
de-duplication, split per metric) as gradlab did before it summarised long runs; the same rows
read leanly (dictionary-encoded strings, no de-duplication); streamed part by part into the
aggregates the report draws from (binned series, tail means, scalars); and gradlab's own
``load_run_for_report`` (the whole-table ways are skipped above ``WHOLE_LOAD_MAX_ROWS`` rows).

    python benchmarks/report_scale.py                 # 100k steps x 4 runs (writes ~GBs once)
    python benchmarks/report_scale.py --quick         # 10k steps
    python benchmarks/report_scale.py --quick --profile
    python benchmarks/report_scale.py --steps 30000 --models resnet110 plain110 resnet20 plain20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

GIB = 1024**3
TARGET_SECONDS, TARGET_GIB = 60.0, 4.0


# -- synthetic runs -------------------------------------------------------------------------------
def step_structure(model: str) -> dict[str, np.ndarray]:
    """The (layer, depth, metric) columns one logged training step of ``model`` has.

    Taken from gradlab's Probe on the real model (one tiny forward/backward), then the scalars
    the training loop adds, in the loop's order: loss, accuracy (with the probe rows), then lr
    and images_per_s.
    """
    import torch
    import torch.nn.functional as F

    from gradlab import create_model
    from gradlab.probing import Probe

    torch.manual_seed(0)
    net = create_model(model, num_classes=10, in_channels=3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with Probe(net) as probe:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        pending = probe.snapshot()
    cols = pending.extend({"loss": loss.detach(), "accuracy": 0.5}).to_host()
    extra = ["lr", "images_per_s"]
    return {"layer": np.concatenate([cols["layer"], np.array(["", ""], dtype=object)]),
            "depth": np.concatenate([cols["depth"], np.full(2, -1, dtype=np.int32)]),
            "metric": np.concatenate([cols["metric"], np.array(extra, dtype=object)])}


def _levels(model: str, s: dict[str, np.ndarray], rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: starting level, relative change over the run, and noise (log scale).

    Planted so the claims have something to find: residual nets have smaller responses, block
    ratios below 1 and smaller identity gaps, and gradients that decay less with depth.
    """
    residual = not model.startswith("plain")
    metric, depth = s["metric"], s["depth"].astype(float)
    rel = depth / max(depth.max(), 1)  # 0 at the input, 1 at the output
    n = len(metric)
    level, change, noise = np.ones(n), np.zeros(n), np.full(n, 0.05)

    def put(name: str, lv, ch=0.0, nz=0.05) -> None:
        m = metric == name
        level[m] = (lv[m] if isinstance(lv, np.ndarray) else lv) * np.exp(rng.normal(0, 0.1,
                                                                                    m.sum()))
        change[m], noise[m] = ch, nz

    put("grad_norm", 0.5 * (1 + rel) if residual else 0.5 * 10 ** (-2 * (1 - rel)), -0.6, 0.3)
    put("weight_norm", 5.0, 0.2, 0.001)
    put("response_std", 0.6 if residual else 1.0, 0.1, 0.05)
    put("response_grad_norm", 10 ** (-2 - (0.3 if residual else 2.5) * (1 - rel)), -0.3, 0.2)
    put("residual_ratio", 0.4, -0.2, 0.1)
    put("residual_cosine", 0.1, 0.0, 0.3)
    put("identity_gap", 0.35 if residual else 1.2, 0.0, 0.05)
    put("loss", 2.3, -0.9, 0.05)
    put("accuracy", 0.1, 7.0, 0.05)
    put("lr", 0.1, 0.0, 0.0)
    put("images_per_s", 900.0, 0.0, 0.03)
    return level, change, noise


def write_run(root: Path, model: str, seed: int, steps: int, part_steps: int) -> Path:
    """One run directory of ``steps`` steps, every step logged, as gradlab writes it."""
    from gradlab.config import TrainConfig
    from gradlab.models import model_info
    from gradlab.runs import MetricWriter, RunDir, versions

    s = step_structure(model)
    rng = np.random.default_rng(zlib.crc32(f"{model}/{seed}".encode()))
    level, change, noise = _levels(model, s, rng)
    info = model_info(model)
    cfg = TrainConfig(model=model, dataset="synthetic", steps=steps, every=1, seed=seed,
                      device="cpu")
    name = f"{model}-synthetic-s{seed}"
    rd = RunDir.create(root / name, {
        "config": cfg.to_dict(),
        "model": {"name": model, "family": info.family, "depth": info.depth,
                  "residual": info.residual, "shortcut": "A" if info.residual else None,
                  "parameters": 0},
        "data": {"name": "synthetic", "train_size": 50000, "test_size": 10000, "channels": 3,
                 "num_classes": 10, "image_size": 32},
        "device": "cpu", "seed": seed, "total_steps": steps,
        "versions": versions(), "git_commit": None, "failure": None}, force=True)
    writer = MetricWriter(rd.metrics_dir)
    eval_every = max(1, steps // 10)
    cols = {"layer": s["layer"], "depth": s["depth"], "metric": s["metric"]}
    ev_layer, ev_depth = np.array(["", ""], dtype=object), np.full(2, -1, dtype=np.int32)
    ev_metric = np.array(["test_loss", "test_accuracy"], dtype=object)
    for start in range(0, steps, part_steps):
        stop = min(steps, start + part_steps)
        frac = (np.arange(start, stop) / steps)[:, None]
        vals = (level * (1 + change * (1 - np.exp(-5 * frac)))
                * np.exp(noise * rng.standard_normal((stop - start, len(level)),
                                                     dtype=np.float32)))
        vals = vals.astype(np.float32).astype(np.float64)  # probes compute in float32
        for i, step in enumerate(range(start, stop)):
            writer.add(step, {**cols, "value": vals[i]})
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                ev = np.array([vals[i, s["metric"] == "loss"][0] * 1.1,
                               vals[i, s["metric"] == "accuracy"][0] * 0.95])
                writer.add(step + 1, {"layer": ev_layer, "depth": ev_depth,
                                      "metric": ev_metric, "value": ev})
        writer.flush()
    rd.mark("completed", final={})
    return rd.path


def generate(workdir: Path, models: list[str], seeds: list[int], steps: int,
             part_steps: int, regenerate: bool = False, log=print) -> list[Path]:
    """Runs for every model x seed under ``workdir/<steps>steps-<part>part`` (reused when
    complete); returns their paths."""
    root = workdir / f"{steps}steps-{part_steps}part"
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in models:
        for seed in seeds:
            path = root / f"{model}-synthetic-s{seed}"
            paths.append(path)
            done = path / ".benchmark-complete"
            if done.exists() and not regenerate:
                continue
            t0 = time.perf_counter()
            write_run(root, model, seed, steps, part_steps)
            done.write_text("ok\n")
            log(f"  wrote {path.name}: {rows_of(path) / 1e6:.1f}M rows, "
                f"{dir_bytes(path / 'metrics') / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
                flush=True)
    return paths


def rows_of(run: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in (run / "metrics").glob("*.parquet"))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- children: the work whose memory is measured ---------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each stage's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Stages:
    """Records (stage, seconds, RSS after, peak during) into a JSON file after every stage, so a
    child killed for memory still says how far it got."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def run(self, name: str, fn):
        _reset_peak()
        t0 = time.perf_counter()
        out = fn()
        st = _status()
        self.rows.append({"stage": name, "seconds": time.perf_counter() - t0,
                          "rss": st.get("VmRSS", 0), "peak": st.get("VmHWM", 0)})
        self.path.write_text(json.dumps(self.rows))
        return out


def child_report(runs: list[Path], out: Path, result: Path) -> None:
    from gradlab.report import build_report

    t0 = time.perf_counter()
    rep = build_report(runs, out, formats=("html", "pdf"))
    result.write_text(json.dumps({
        "seconds": time.perf_counter() - t0,
        "verdicts": {c.id: c.verdict for c in rep.claims}}))


def child_stages(runs: list[Path], out: Path, result: Path) -> None:
    import datetime as dt

    from gradlab import __version__
    from gradlab.report import CLAIMS, _default_title
    from gradlab.report.claims import evaluate_claims
    from gradlab.report.figures import make_figures
    from gradlab.report.html import render_html
    from gradlab.report.load import load_runs
    from gradlab.report.pdf import render_pdf

    st = _Stages(result)
    st.run("import", lambda: None)
    runset = st.run("load", lambda: load_runs(runs))
    results = st.run("claims", lambda: evaluate_claims(runset, CLAIMS))
    figures = st.run("figures", lambda: make_figures(runset))
    kw = dict(title=_default_title(runset), version=__version__,
              generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    html = st.run("html", lambda: render_html(results, runset, figures, **kw))
    pdf = st.run("pdf", lambda: render_pdf(results, runset, figures, **kw))
    (out / "report.html").write_text(html)
    (out / "report.pdf").write_bytes(pdf)


def child_load(run: Path, mode: str, result: Path) -> None:
    """Load one run's report metrics three ways, each in its own child (own peak RSS):

    * ``current``: step by step what ``read_metrics`` + ``load._split_tables`` do;
    * ``lean``: the same rows, but layer/metric read as Parquet dictionaries (pandas
      categoricals, never Python or Arrow strings), no de-duplication (parts hold disjoint step
      ranges unless a run was resumed over old parts, which the footers' step statistics tell),
      no re-sort (parts are in step order): the floor for holding every row;
    * ``stream``: part by part, reduced on the fly to what the claims and figures use: every
      (metric, layer) binned into ``figures.MAX_POINTS`` step ranges (sum, count, min, max) plus
      its mean over the last 10% of steps; only model-wide scalars are kept whole (the sketch
      that ``gradlab.report.load`` now implements);
    * ``gradlab``: ``gradlab.report.load.load_run_for_report`` itself, as the report loads it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gradlab.report.figures import MAX_POINTS
    from gradlab.report.load import REPORT_METRICS, TAIL_FRACTION, _split_tables
    from gradlab.runs import METRICS_SCHEMA

    st = _Stages(result)
    parts = sorted((run / "metrics").glob("part-*.parquet"))
    filters = [("metric", "in", list(REPORT_METRICS))]
    state: dict = {}
    st.run("import", lambda: None)

    def held(frames) -> None:
        n = sum(len(t) for t in frames)
        b = sum(int(t.memory_usage(deep=True).sum()) for t in frames)
        st.rows.append({"stage": f"{mode}: frames held ({n / 1e6:.1f}M rows, {b / max(n, 1):.0f}"
                                 " B/row)", "seconds": 0, "rss": b, "peak": b})
        st.path.write_text(json.dumps(st.rows))

    if mode == "gradlab":
        from gradlab.report.load import load_run_for_report

        run_ = st.run("gradlab: load_run_for_report", lambda: load_run_for_report(run))
        s = run_.summary
        b = sum(int(t.memory_usage(deep=True).sum()) for t in run_.tables.values())
        if s is not None:
            b += sum(a.nbytes for a in (s.sums, s.counts, s.step_sums, s.mins, s.maxs))
        st.rows.append({"stage": "gradlab: " + ("summary" if s is not None else "tables")
                        + " held", "seconds": 0, "rss": b, "peak": b})
        st.path.write_text(json.dumps(st.rows))
    elif mode == "current":
        def read():
            state["tables"] = [pq.read_table(p, columns=METRICS_SCHEMA.names, filters=filters)
                               for p in parts]
        st.run("current: read parts (filtered)", read)
        st.run("current: concat_tables", lambda: state.update(
            t=pa.concat_tables(state.pop("tables"))))
        st.run("current: to_pandas", lambda: state.update(df=state.pop("t").to_pandas()))
        st.run("current: drop_duplicates", lambda: state.update(df=state["df"].drop_duplicates(
            ["step", "layer", "metric"], keep="last", ignore_index=True)))
        st.run("current: split per metric (category, sort)",
               lambda: state.update(tables=_split_tables(state.pop("df"))))
        held(state["tables"].values())
    elif mode == "lean":
        def read():
            tables = [pq.read_table(p, columns=METRICS_SCHEMA.names, filters=filters,
                                    read_dictionary=["layer", "metric"]) for p in parts]
            state["t"] = pa.concat_tables(tables, promote_options="permissive")
        st.run("lean: dictionary read (filtered)", read)
        st.run("lean: to_pandas", lambda: state.update(df=state.pop("t").to_pandas()))

        def split():
            df = state.pop("df")
            state["tables"] = {str(m): g.drop(columns="metric").reset_index(drop=True)
                               for m, g in df.groupby("metric", observed=True, sort=False)}
        st.run("lean: split per metric", split)
        held(state["tables"].values())
    else:
        steps_total = max(pq.ParquetFile(p).metadata.row_group(0).column(0).statistics.max
                          for p in parts) + 1  # from the footers: no data read
        edges = np.linspace(0, steps_total, MAX_POINTS + 1)
        tail_from = int(steps_total * (1 - TAIL_FRACTION))

        def stream():
            keys: dict[tuple[str, str], int] = {}
            size = 0
            acc = {k: np.zeros((0, MAX_POINTS)) for k in ("sum", "count", "min", "max")}
            tail = np.zeros((0, 2))
            scalars = []
            for p in parts:
                t = pq.read_table(p, columns=METRICS_SCHEMA.names, filters=filters,
                                  read_dictionary=["layer", "metric"])
                layer, metric = t["layer"].combine_chunks(), t["metric"].combine_chunks()
                glob = {}  # (dictionary code pair) -> accumulator row, via the small dicts
                ld, md = layer.dictionary.to_pylist(), metric.dictionary.to_pylist()
                li = layer.indices.to_numpy(zero_copy_only=False)
                mi = metric.indices.to_numpy(zero_copy_only=False)
                pair = mi.astype(np.int64) * len(ld) + li
                uniq, inv = np.unique(pair, return_inverse=True)
                for u in uniq:
                    k = (md[u // len(ld)], ld[u % len(ld)])
                    glob[u] = keys.setdefault(k, len(keys))
                row = np.array([glob[u] for u in uniq])[inv]
                if len(keys) > size:  # room for new (metric, layer) pairs
                    grow = len(keys) - size
                    for k, fill in (("sum", 0.0), ("count", 0.0), ("min", np.inf),
                                    ("max", -np.inf)):
                        acc[k] = np.vstack([acc[k], np.full((grow, MAX_POINTS), fill)])
                    tail = np.vstack([tail, np.zeros((grow, 2))])
                    size = len(keys)
                step = t["step"].to_numpy()
                value = t["value"].to_numpy()
                b = np.clip(np.searchsorted(edges, step, side="right") - 1, 0, MAX_POINTS - 1)
                flat = row * MAX_POINTS + b
                n = size * MAX_POINTS
                acc["sum"] += np.bincount(flat, value, n).reshape(size, MAX_POINTS)
                acc["count"] += np.bincount(flat, None, n).reshape(size, MAX_POINTS)
                np.minimum.at(acc["min"].reshape(-1), flat, value)
                np.maximum.at(acc["max"].reshape(-1), flat, value)
                in_tail = step >= tail_from
                tail[:, 0] += np.bincount(row[in_tail], value[in_tail], size)
                tail[:, 1] += np.bincount(row[in_tail], None, size)
                wide = pc.equal(t["layer"], "")  # model-wide scalars: kept whole
                scalars.append(t.filter(wide).select(["step", "metric", "value"]))
            state["binned"] = acc
            state["tail"] = tail
            state["scalars"] = pa.concat_tables(scalars).to_pandas()
        st.run("stream: bins + tail means per part", stream)
        b = sum(v.nbytes for v in state["binned"].values()) + state["tail"].nbytes + int(
            state["scalars"].memory_usage(deep=True).sum())
        st.rows.append({"stage": "stream: aggregates held", "seconds": 0, "rss": b, "peak": b})
        st.path.write_text(json.dumps(st.rows))


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (load workers, forkservers), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def spawn(args: list[str], result: Path, cap: int, env: dict | None = None) -> dict:
    """Run this script as a child; return its JSON result plus ``maxrss`` and ``killed``.

    ``maxrss`` counts the whole process tree: the child's own peak (``ru_maxrss``) or, when
    larger, the largest sum of resident memory over the child and its descendants (the report's
    parallel load workers) seen while polling every 50 ms. Shared pages count once per process,
    so the sum is an upper bound.
    """
    cmd = [sys.executable, __file__, *args, "--result", str(result)]
    log = result.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    killed, polled = False, 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree = _tree(proc.pid)
        rss = sum(_rss(p) for p in tree)
        polled = max(polled, rss)
        if rss > cap and not killed:
            for p in reversed(tree):  # the workers first, then the child
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            killed = True
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out: dict = {}
    if result.exists() and result.stat().st_size:
        out = json.loads(result.read_text())
        out = out if isinstance(out, dict) else {"stages": out}
    out.update(maxrss=max(ru.ru_maxrss * 1024, polled), killed=killed, rc=proc.returncode)
    if proc.returncode and not killed:
        out["error"] = log.read_text()[-2000:]
    return out


# -- main ------------------------------------------------------------------------------------------
def _joined(runs: list[Path]) -> str:
    return os.pathsep.join(map(str, runs))


def measure(runs: list[Path], cap: int) -> dict:
    """build_report (html + pdf) on ``runs``, in a child: seconds, peak bytes, verdicts."""
    with tempfile.TemporaryDirectory() as tmp:
        r = spawn(["--child", "report", _joined(runs), str(Path(tmp) / "report")],
                  Path(tmp) / "result.json", cap)
        if (Path(tmp) / "report").exists():
            r["bytes"] = dir_bytes(Path(tmp) / "report")
    return r


#: Above this many rows a run is not loaded the old ways (whole tables) when profiling: they
#: need several GiB, which a shared machine may not have.
WHOLE_LOAD_MAX_ROWS = 20_000_000


def profile(runs: list[Path], cap: int) -> tuple[dict, dict[str, dict]]:
    """Per-stage time/peak of the report, and the loading breakdown of the first run."""
    modes = ("current", "lean", "stream", "gradlab")
    if rows_of(runs[0]) > WHOLE_LOAD_MAX_ROWS:
        modes = ("stream", "gradlab")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "out").mkdir()
        stages = spawn(["--child", "stages", _joined(runs), str(Path(tmp) / "out")],
                       Path(tmp) / "stages.json", cap)
        load = {mode: spawn(["--child", "load", str(runs[0]), mode],
                            Path(tmp) / f"load-{mode}.json", cap)
                for mode in modes}
    return stages, load


def _print_stages(title: str, r: dict) -> None:
    print(f"{title}{' (killed at the memory cap)' if r.get('killed') else ''}")
    print(f"  {'stage':<44}{'seconds':>9}{'RSS after GiB':>15}{'peak GiB':>10}")
    for s in r.get("stages", []):
        print(f"  {s['stage']:<44}{s['seconds']:>9.1f}{s['rss'] / GIB:>15.2f}"
              f"{s['peak'] / GIB:>10.2f}")
    if r.get("error"):
        print("  error: " + r["error"].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--models", nargs="+", default=["resnet110", "plain110"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--part-steps", type=int, default=1000, help="steps per Parquet part")
    ap.add_argument("--workdir", type=Path,
                    default=Path(tempfile.gettempdir()) / "gradlab-report-scale")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--mem-cap-gib", type=float, default=None,
                    help="kill a child above this RSS (default: 75%% of physical memory)")
    ap.add_argument("--profile", action="store_true",
                    help="also time the report's stages and one run's loading")
    ap.add_argument("--quick", action="store_true", help="10k steps")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, src, dst = a.child
        paths = [Path(p) for p in src.split(os.pathsep)]
        {"report": lambda: child_report(paths, Path(dst), a.result),
         "stages": lambda: child_stages(paths, Path(dst), a.result),
         "load": lambda: child_load(Path(src), dst, a.result)}[kind]()
        return
    steps = 10_000 if a.quick else a.steps
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cap = int(a.mem_cap_gib * GIB) if a.mem_cap_gib else int(0.75 * total)
    print(f"{len(a.models) * len(a.seeds)} runs ({', '.join(a.models)} x seeds "
          f"{', '.join(map(str, a.seeds))}), {steps} steps each, every step logged, parts of "
          f"{a.part_steps} steps; memory cap {cap / GIB:.1f} GiB", flush=True)
    t0 = time.perf_counter()
    runs = generate(a.workdir, a.models, a.seeds, steps, a.part_steps, a.regenerate)
    rows = sum(rows_of(p) for p in runs)
    disk = sum(dir_bytes(p) for p in runs)
    print(f"runs ready in {time.perf_counter() - t0:.0f} s: {runs[0].parent}", flush=True)
    r = measure(runs, cap)
    ok = not r["killed"] and r["rc"] == 0
    secs = r.get("seconds", float("nan"))
    gib = r["maxrss"] / GIB
    print(f"{'steps':>8}{'runs':>6}{'rows (M)':>10}{'disk GB':>9}{'report s':>10}"
          f"{'peak GiB':>10}{'< 60 s':>8}{'< 4 GiB':>9}  verdicts")
    verdicts = ", ".join(f"{k} {v}" for k, v in r.get("verdicts", {}).items()) or \
        ("killed at the memory cap" if r["killed"] else r.get("error", "failed").strip()
         .splitlines()[-1])
    print(f"{steps:>8}{len(a.models) * len(a.seeds):>6}{rows / 1e6:>10.1f}{disk / 1e9:>9.2f}"
          f"{secs:>10.1f}{gib:>10.2f}{'yes' if ok and secs < TARGET_SECONDS else 'NO':>8}"
          f"{'yes' if ok and gib < TARGET_GIB else 'NO':>9}  {verdicts}", flush=True)
    if a.profile or not ok or secs >= TARGET_SECONDS or gib >= TARGET_GIB:
        stages, load = profile(runs, cap)
        _print_stages(f"build_report by stage (peak RSS of the child {stages['maxrss'] / GIB:.2f}"
                      " GiB)", stages)
        n = rows_of(runs[0]) / 1e6
        for mode, r in load.items():
            _print_stages(f"loading {runs[0].name} ({n:.1f}M rows on disk), {mode} (child peak "
                          f"{r['maxrss'] / GIB:.2f} GiB; 'held' rows: bytes kept, not RSS)", r)


if __name__ == "__main__":
    main()
