"""Smoke tests for benchmarks/: each script's core function runs with tiny arguments.

No timing is asserted (the numbers of a busy CI machine mean nothing); these only keep the
scripts working as gradlab changes under them.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    key = f"gradlab_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


CPU = torch.device("cpu")


def test_probe_overhead_measure(monkeypatch):
    po = _load("probe_overhead")
    logged = collections.Counter()
    real_step = po.Trainer.step

    def counting(self, idx, lr, log, **kw):
        out = real_step(self, idx, lr, log, **kw)
        logged[(bool(self.probe._handles), log)] += 1  # hooks of the step just run
        return out

    monkeypatch.setattr(po.Trainer, "step", counting)
    r = po.measure("resnet8", batch=4, everies=[1, 2], windows=2, device=CPU,
                   tensorboard=True, amp="off")
    assert set(r) == {"unprobed_ms", "bf16"} | {
        f"every_{e}{k}" for e in (1, 2) for k in ("", "_ci", "_pooled", "_ms", "_ms_ci")}
    assert r["bf16"] is False
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("unprobed_ms", "every_1", "every_2"))
    for e in (1, 2):
        lo, hi = r[f"every_{e}_ci"]
        assert lo <= r[f"every_{e}"] <= hi
        lo, hi = r[f"every_{e}_ms_ci"]
        assert lo <= r[f"every_{e}_ms"] <= hi
    # 2 warm-up rounds + 2 windows of 2 rounds, 3 modes each: 18 steps. Logged: every 1 all 6
    # of its steps, every 2 half of them (3). Hooks exist only while a step is logged.
    assert logged == {(False, False): 9, (True, True): 9}


def test_probe_overhead_arithmetic_on_a_fake_clock(monkeypatch):
    """Steps of a known cost: 0.5 s, and 20 ms more when logged. Every ratio and every
    per-logged-step figure must come back exactly."""
    po = _load("probe_overhead")
    now = [0.0]
    real_step = po.Trainer.step

    def step(self, idx, lr, log, **kw):
        out = real_step(self, idx, lr, log, **kw)
        now[0] += 0.5 + (0.02 if log else 0.0)
        return out

    monkeypatch.setattr(po.Trainer, "step", step)
    monkeypatch.setattr(po.time, "perf_counter", lambda: now[0])
    r = po.measure("resnet8", batch=4, everies=[1, 2, 4], windows=2, device=CPU,
                   tensorboard=False, amp="off")
    for e in (1, 2, 4):
        assert r[f"every_{e}"] == pytest.approx(1 + 0.04 / e)
        assert r[f"every_{e}_pooled"] == pytest.approx(1 + 0.04 / e)
        assert r[f"every_{e}_ms"] == pytest.approx(20.0)
        assert r[f"every_{e}_ms_ci"] == pytest.approx((20.0, 20.0))
    assert r["unprobed_ms"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="must divide"):
        po.measure("resnet8", batch=4, everies=[3, 10], windows=1, device=CPU,
                   tensorboard=False, amp="off")


def test_probe_overhead_unprobed_loop_has_no_hooks():
    from gradlab import create_model
    from gradlab.probing import Probe

    po = _load("probe_overhead")
    model = create_model("resnet8")
    probe = Probe(model)
    probe.attach()
    assert po.hook_count(model) > 0
    probe.detach()
    assert po.hook_count(model) == 0


def test_throughput_compare_and_variants():
    tp = _load("throughput")
    r = tp.compare("resnet8", batch=4, rounds=1, block=2, device=CPU, train_size=16,
                   workers=(0,))
    assert list(r) == ["gradlab", "gradlab every 10", "gradlab float32", "hand-written w0"]
    assert all(v > 0 for v in r.values())
    v = tp.variants("resnet8", batch=4, rounds=1, block=2, device=CPU,
                    names=("fast path", "foreach off", "bf16 off", "1 thread",
                           "DataLoader aug w0"), train_size=16)
    assert list(v) == ["fast path", "foreach off", "bf16 off", "1 thread", "DataLoader aug w0"]
    assert all(x > 0 for x in v.values())


def test_throughput_per_sample_augmentation_shapes():
    tp = _load("throughput")
    x, y = torch.randn(3, 3, 8, 8), torch.arange(3)
    img, label = tp.PerSampleCIFAR(x, y, pad=2)[1]
    assert img.shape == (3, 8, 8) and int(label) == 1
    # Unpadded pixels of a crop are pixels of the image (possibly mirrored), never invented.
    same = tp.PerSampleCIFAR(x, y, pad=0, augment=True)[0][0]
    assert torch.equal(same, x[0]) or torch.equal(same, x[0].flip(-1))


def test_report_scale_generates_schema_runs(tmp_path):
    rs = _load("report_scale")
    runs = rs.generate(tmp_path, ["resnet8", "plain8"], [0, 1], steps=12, part_steps=5,
                       log=lambda *a, **k: None)
    assert len(runs) == 4
    run = runs[0]
    from gradlab.runs import METRICS_SCHEMA, load_run

    parts = sorted((run / "metrics").glob("part-*.parquet"))
    assert len(parts) == 3  # 5 + 5 + 2 steps
    assert pq.read_schema(parts[0]).remove_metadata().equals(METRICS_SCHEMA)
    df = load_run(run).metrics
    per_step = len(rs.step_structure("resnet8")["metric"])
    train_rows = df[~df.metric.isin(["test_loss", "test_accuracy"])]
    assert len(train_rows) == 12 * per_step
    assert sorted(df.step.unique()) == list(range(13))  # eval rows land at step + 1
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    # Reused, not rewritten, on a second call.
    mtime = parts[0].stat().st_mtime_ns
    rs.generate(tmp_path, ["resnet8"], [0], steps=12, part_steps=5, log=lambda *a, **k: None)
    assert parts[0].stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_report_scale_measures_build_report_in_a_child(tmp_path):
    rs = _load("report_scale")
    runs = rs.generate(tmp_path, ["resnet8", "plain8"], [0, 1], steps=8, part_steps=4,
                       log=lambda *a, **k: None)
    r = rs.measure(runs, 8 * rs.GIB)
    assert r["rc"] == 0 and not r["killed"], r.get("error")
    assert r["seconds"] > 0 and r["maxrss"] > 0 and r["bytes"] > 0
    assert set(r["verdicts"]) == {"degradation", "smaller-responses", "near-identity",
                                  "gradient-flow"}


@pytest.mark.parametrize("mode", ["current", "lean", "stream"])
def test_report_scale_load_modes(tmp_path, mode):
    rs = _load("report_scale")
    run = rs.generate(tmp_path, ["resnet8"], [0], steps=6, part_steps=3,
                      log=lambda *a, **k: None)[0]
    out = tmp_path / f"{mode}.json"
    rs.child_load(run, mode, out)
    stages = json.loads(out.read_text())
    assert stages[-1]["rss"] > 0 and all(s["seconds"] >= 0 for s in stages)


def test_storage_sizes(tmp_path):
    st = _load("storage")
    r = st.real_run(3, tmp_path / "real", model="resnet8")
    assert r["rows"] > 0 and r["parquet"] > 0 and r["tb"] > 0
    assert sum(r["per_col"].values()) <= r["parquet"]
    s = st.synthetic_run(4, 2, tmp_path / "work", tb_steps=2, tmp=tmp_path, model="resnet8")
    per_step = len(_load("report_scale").step_structure("resnet8")["metric"])
    assert 2 * per_step <= s["tb_rows"] <= 2 * per_step + 4  # + evaluation rows
    assert s["rows"] >= 4 * per_step and s["tb"] > 0
