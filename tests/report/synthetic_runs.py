"""Synthetic run directories with planted truth, for the report tests.

(Its own module, not conftest.py, so tests can import the helpers by a unique name.)

Each run is written the way ``gradlab.runs`` writes one: ``run.json`` (schema_version 1) and one
Parquet part with the exact long-table schema. Layer names and forward-order depths follow the
real CIFAR ResNet (``conv1, bn1, layer{s}.{i}, layer{s}.{i}.conv1/bn1/conv2/bn2, ..., fc``), and
the plainN twin has the same names, so layers match between plainN and resnetN.

``truth`` plants each claim's effect: +1 plants the claim (e.g. deeper plain ends worse), -1 the
opposite, 0 no effect. Noise is seeded by (model, seed), so every test sees the same numbers.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradlab.runs import METRICS_SCHEMA

CLAIM_IDS = ("degradation", "smaller-responses", "near-identity", "gradient-flow")
MODELS = ("plain20", "plain56", "resnet20", "resnet56")
SUPPORTED = dict.fromkeys(CLAIM_IDS, 1)
OPPOSITE = dict.fromkeys(CLAIM_IDS, -1)


def layer_names(depth: int) -> tuple[list[str], list[str], list[str]]:
    """Forward-order names of all probed modules, the BN layers and the blocks of a CIFAR net."""
    n = (depth - 2) // 6
    order = ["conv1", "bn1"]
    blocks = []
    for s in (1, 2, 3):
        for i in range(n):
            b = f"layer{s}.{i}"
            blocks.append(b)
            order += [b, f"{b}.conv1", f"{b}.bn1", f"{b}.conv2", f"{b}.bn2"]
    order.append("fc")
    bns = [x for x in order if x.endswith(("bn1", "bn2"))]
    return order, bns, blocks


def _planted_loss(family: str, depth: int, t: int) -> float:
    # +1: deeper plain ends worse, deeper residual no worse (slightly better), as in Fig. 1/6.
    table = {1: {("plain", 20): 0.20, ("plain", 56): 0.45, ("resnet", 20): 0.18,
                 ("resnet", 56): 0.13},
             -1: {("plain", 20): 0.45, ("plain", 56): 0.20, ("resnet", 20): 0.13,
                  ("resnet", 56): 0.35},
             0: {("plain", 20): 0.25, ("plain", 56): 0.25, ("resnet", 20): 0.25,
                 ("resnet", 56): 0.25}}
    return table[t][(family, depth)]


def make_run(root: Path, model: str, seed: int, *, steps: int = 600, every: int = 10,
             dataset: str = "digits", truth: dict[str, int] | None = None,
             status: str = "completed", name: str | None = None,
             failure: dict | None = None, noise: float = 0.03,
             dirname: str | None = None) -> Path:
    """Write one synthetic run directory (``root/dirname``, default its name); return it."""
    truth = {**SUPPORTED, **(truth or {})}
    family = "plain" if model.startswith("plain") else "resnet"
    depth = int(model.removeprefix(family))
    residual = family == "resnet"
    name = name or f"{model}-s{seed}" + (f"-{dataset}" if dataset != "digits" else "")
    path = Path(root) / (dirname or name)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(f"{model}/{seed}/{dataset}".encode()))

    order, bns, blocks = layer_names(depth)
    depth_of = {n: i for i, n in enumerate(order)}
    logged = np.arange(0, steps + 1, every, dtype=np.int64)
    if logged[-1] != steps:
        logged = np.append(logged, steps)
    frac = logged / max(steps, 1)
    S = len(logged)
    approach = 1 - np.exp(-5 * frac)  # 0 at init, ~1 at the end

    rows_layer, rows_metric, rows_init, rows_final, rows_noise = [], [], [], [], []

    def add(layer: str, metric: str, init: float, final: float, jitter: float = noise) -> None:
        rows_layer.append(layer)
        rows_metric.append(metric)
        rows_init.append(init)
        rows_final.append(final)
        rows_noise.append(jitter)

    t = truth
    # response_std (Fig. 7): residual nets smaller at matched layers, and smaller when deeper.
    res_factor = {1: 0.6, -1: 1.6, 0: 1.0}[t["smaller-responses"]]
    deep_factor = {1: 0.75, -1: 1.3, 0: 1.0}[t["smaller-responses"]] if depth > 20 else 1.0
    # response_grad_norm: log10 slope per BN rank; plain decays faster when the claim holds.
    slope = {1: {"plain": -0.05, "resnet": -0.004}, -1: {"plain": -0.004, "resnet": -0.05},
             0: {"plain": -0.02, "resnet": -0.02}}[t["gradient-flow"]][family]
    for k, bn in enumerate(bns):
        base = 1.0 + 0.3 * np.sin(2 * np.pi * k / len(bns))  # mean exactly 1 at any depth
        std = base * (res_factor * deep_factor if residual else 1.0)
        std *= float(np.exp(rng.normal(0, noise)))
        add(bn, "response_std", std * 0.9, std)
        g = 10 ** (-2 + slope * k + rng.normal(0, noise / 3))
        add(bn, "response_grad_norm", g, g * 0.8)
    add("fc", "response_std", 3.0, 3.0)
    add("fc", "response_grad_norm", 0.05, 0.04)
    for layer in order:
        if layer.endswith(("conv1", "conv2", "bn1", "bn2")) or layer == "fc":
            w = 5.0 * float(np.exp(rng.normal(0, 0.1)))
            add(layer, "weight_norm", w, w * 1.2, 0.001)
            add(layer, "grad_norm", 0.5, 0.1)
    for b in blocks:
        first_of_stage = b in ("layer2.0", "layer3.0")
        if residual:
            final_ratio = {1: 0.3, -1: 3.0, 0: 1.0}[t["near-identity"]]
            r = final_ratio * float(np.exp(rng.normal(0, 0.3)))
            add(b, "residual_ratio", 0.8, r)
            add(b, "residual_cosine", 0.0, 0.1)
        if not first_of_stage:
            gaps = {1: (1.2, 0.35), -1: (0.6, 1.5), 0: (0.8, 0.8)}[t["near-identity"]]
            gap = (gaps[1] if residual else gaps[0]) * float(np.exp(rng.normal(0, noise)))
            add(b, "identity_gap", 1.0, gap)

    L = len(rows_layer)
    init = np.repeat(np.asarray(rows_init)[None, :], S, axis=0)
    final = np.repeat(np.asarray(rows_final)[None, :], S, axis=0)
    jit = np.asarray(rows_noise)[None, :]
    values = (init + (final - init) * approach[:, None]) * np.exp(rng.normal(0, 1, (S, L)) * jit)
    layer_col = np.tile(np.asarray(rows_layer, dtype=object), S)
    metric_col = np.tile(np.asarray(rows_metric, dtype=object), S)
    depth_col = np.array([depth_of[x] for x in rows_layer] * S, dtype=np.int32)
    step_col = np.repeat(logged, L)
    val_col = values.reshape(-1)

    # Model-wide scalars: loss/accuracy at every logged step, test metrics at eval steps.
    final_loss = _planted_loss(family, depth, t["degradation"]) + rng.normal(0, 0.01)
    loss = final_loss + (2.3 - final_loss) * np.exp(-6 * frac) + rng.normal(0, 0.02, S)
    loss = np.abs(loss)
    acc = np.clip(1 - loss / 2.5, 0, 1)
    evals = np.flatnonzero((logged % 100 == 0) | (logged == logged[-1]))
    scal_steps = [logged, logged, logged, logged, logged[evals], logged[evals]]
    scal_names = ["loss", "accuracy", "lr", "images_per_s", "test_loss", "test_accuracy"]
    scal_vals = [loss, acc, np.full(S, 0.1), np.full(S, 900.0), loss[evals] * 1.1,
                 acc[evals] * 0.97]
    for st, nm, v in zip(scal_steps, scal_names, scal_vals, strict=True):
        step_col = np.concatenate([step_col, st])
        layer_col = np.concatenate([layer_col, np.full(len(st), "", dtype=object)])
        depth_col = np.concatenate([depth_col, np.full(len(st), -1, dtype=np.int32)])
        metric_col = np.concatenate([metric_col, np.full(len(st), nm, dtype=object)])
        val_col = np.concatenate([val_col, v])

    table = pa.table({"step": pa.array(step_col, pa.int64()),
                      "layer": pa.array(layer_col, pa.string()),
                      "depth": pa.array(depth_col, pa.int32()),
                      "metric": pa.array(metric_col, pa.string()),
                      "value": pa.array(val_col, pa.float64())}, schema=METRICS_SCHEMA)
    (path / "metrics").mkdir(exist_ok=True)
    pq.write_table(table, path / "metrics" / "part-000001.parquet")

    info = {
        "schema_version": 1, "name": name, "status": status,
        "created": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:10:00+00:00",
        "finished": "2026-01-01T00:10:00+00:00",
        "config": {"model": model, "dataset": dataset, "steps": steps, "batch_size": 128,
                   "lr": 0.1, "every": every, "seed": seed, "warmup_steps": 0,
                   "shortcut": "A"},
        "model": {"name": model, "family": family, "depth": depth, "residual": residual,
                  "shortcut": "A" if residual else None, "parameters": 1000 * depth},
        "data": {"name": dataset, "train_size": 1437, "test_size": 360, "channels": 1,
                 "num_classes": 10, "image_size": 8},
        "device": "cpu", "seed": seed,
        "versions": {"gradlab": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.7",
                     "platform": "Linux"},
        "git_commit": None, "failure": failure,
    }
    (path / "run.json").write_text(json.dumps(info, indent=2))
    return path


def make_suite(root: Path, *, models: tuple[str, ...] = MODELS, seeds: tuple[int, ...] = (0, 1, 2),
               **kw) -> Path:
    """Write models x seeds runs under ``root`` and return ``root``."""
    for m in models:
        for s in seeds:
            make_run(root, m, s, **kw)
    return Path(root)
