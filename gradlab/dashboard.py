"""TensorBoard dashboards for gradlab runs: scalars, layout, depth profiles, hparams, report.

What a run writes (under ``runs/<name>/tb``), and why it is shaped that way:

* **Scalars**, one per layer and metric, tagged ``<metric>/<layer>``
  (``residual_ratio/layer2.3``, ``grad_norm/layer1.0.conv1``); model-wide scalars are the
  metric alone (``loss``, ``test_accuracy``, ``lr``, ``images_per_s``). TensorBoard's tag
  filter is a regex, so ``^residual_ratio/`` selects a metric and ``layer2\\.3`` a block.
* **A custom-scalars layout** (the *Custom Scalars* tab): a ``model`` category (loss and
  test_loss in one chart, accuracy and test_accuracy in another, lr, images_per_s), then one
  category per metric with one multi-line chart per stage: ``stem`` (conv1, bn1), ``stage 1``,
  ``stage 2``, ``stage 3`` (regex ``^residual_ratio/layer2(\\.|$)``) and ``head`` (fc). A
  stage holds at most a few dozen lines, few enough to read, and the regexes are the same for
  every run of a family, so TensorBoard merges the layouts of a suite's runs into one.
* **Depth profiles**, the network seen along its depth at one step, for residual_ratio,
  identity_gap, response_std, response_grad_norm and grad_norm, in two forms:

  - a *panel image* (tag ``depth_profile``, the *Images* tab): one row per metric, value
    against depth (forward order of the modules, stages shaded and named) on one shared x axis,
    so a block's residual ratio, its response and the gradient reaching it line up vertically.
    The step drawn is bold; the previous few drawn steps fade behind it, so one image shows the
    trend and the step slider scrubs it through training. Gradient norms are on a log axis (they
    span decades along a plain net); residual_ratio has a dashed line at 1 (``||F(x)|| =
    ||x||``). Every run draws the same rows (a note where a metric does not apply, e.g. no
    residual blocks in a plain net), so a plain and a residual run compare side by side. This
    is the picture the papers draw (He et al. 2015, Fig. 7). A panel costs ~0.15 s of CPU, so a
    run draws at most ``max_images`` (50 by default), evenly over its planned steps plus the
    final step, on a renderer thread of its own, so neither training nor the metric writer
    waits for it (matplotlib does hold the GIL while it draws: ~7 s of CPU over a whole run at
    the default). TensorBoard is started with room for 100 images per tag (its default is 10).
  - a *histogram* per metric at every logged step (``<metric>/across_layers``; gradient norms
    as ``log10_<metric>/across_layers``): the distribution of the per-layer values, cheap
    enough for every step. The *Distributions* tab then shows how the spread across layers
    evolves (e.g. whether most blocks keep residual_ratio below 1). Histograms bin by value and
    cannot keep depth order, which is why the ordered profile is an image and not a histogram
    with depth smuggled into its x axis.
* **Hparams** in the run's own log dir (no sub-run): model, family, depth, shortcut, dataset,
  lr, steps, batch_size and seed when the run starts (so running runs are listed), and the
  metrics ``final/loss``, ``final/accuracy``, ``final/test_loss``, ``final/test_accuracy`` and
  ``final/residual_ratio_mean`` (mean over blocks at the last logged step) when it completes.
  Every run writes the same experiment description, so the *HParams* tab over a suite's runs
  directory lists all runs side by side, sortable and filterable (family: plain / resnet).
* **The run's configuration** as a text summary (``run/config``, the *Text* tab).

A suite's report adds its verdict table and figures with :func:`write_report`, and
:func:`serve` starts TensorBoard in-process on loopback over a runs directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import queue
import re
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Dashboard",
    "DashboardError",
    "DashboardServer",
    "DepthProfilePanel",
    "FINAL_METRICS",
    "PROFILE_METRICS",
    "find_logdirs",
    "launch",
    "serve",
    "write_report",
    "layer_stage",
    "render_depth_profile",
    "run_hparams",
]

#: Per-layer metrics drawn as depth profiles (images and histograms across layers).
PROFILE_METRICS = ("residual_ratio", "identity_gap", "response_std", "response_grad_norm",
                   "grad_norm")
#: Profiles drawn on a log axis (and histogrammed as log10): gradients span decades in depth.
LOG_METRICS = frozenset({"grad_norm", "response_grad_norm"})
#: Category order in the custom-scalars layout; metrics not listed follow alphabetically.
_METRIC_ORDER = ("residual_ratio", "residual_cosine", "identity_gap", "response_std",
                 "response_grad_norm", "grad_norm", "weight_norm")
#: Model-wide charts: title -> metrics drawn together (train and test on one chart).
_MODEL_CHARTS = {"loss": ("loss", "test_loss"), "accuracy": ("accuracy", "test_accuracy"),
                 "lr": ("lr",), "images_per_s": ("images_per_s",)}
#: Metrics of the hparams table (scalars written at close, tags ``final/<name>``).
FINAL_METRICS = ("loss", "accuracy", "test_loss", "test_accuracy", "residual_ratio_mean")
#: Families known to gradlab; the hparams filter shows them as checkboxes.
FAMILIES = ("plain", "resnet")
_STAGE_RE = re.compile(r"^layer(\d+)(?:\.|$)")
_EVENT_GLOB = "events.out.tfevents.*"


class DashboardError(ValueError):
    """A dashboard that cannot be written or served; ``str(e)`` is one line for the CLI."""


def layer_stage(layer: str) -> int | None:
    """The stage K of a module named ``layerK`` or ``layerK.*``; None for stem and head."""
    m = _STAGE_RE.match(layer)
    return int(m.group(1)) if m else None


# -- protos ---------------------------------------------------------------------------------------
# Summaries are built as protos directly (tensorboard's own, no TensorFlow, no torch) and written
# by _EventWriter: one Event per logged step carries all its scalars, which is several times
# cheaper than one add_scalar call (and one Event) per row.

def _pb():
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

    return event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2


def _string_tensor(data: bytes):
    _, _, tensor_pb2, shape_pb2 = _pb()
    return tensor_pb2.TensorProto(dtype=7, tensor_shape=shape_pb2.TensorShapeProto(),  # DT_STRING
                                  string_val=[data])


def _text_value(tag: str, markdown: str, description: str = ""):
    from tensorboard.plugins.text import metadata as text_metadata

    _, summary_pb2, _, _ = _pb()
    meta = text_metadata.create_summary_metadata(display_name="", description=description)
    return summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                     tensor=_string_tensor(markdown.encode()))


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (no image library needed)."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise DashboardError("figure is not a PNG image")
    return struct.unpack(">II", png[16:24])


def _image_value(tag: str, png: bytes, description: str = ""):
    _, summary_pb2, _, _ = _pb()
    width, height = _png_size(png)
    meta = summary_pb2.SummaryMetadata(summary_description=description) if description else None
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4,
                                      encoded_image_string=png)
    return summary_pb2.Summary.Value(tag=tag, image=image, metadata=meta)


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _ScalarSummary:
    """The scalars of a logged step as a serialized ``Summary``, from a template made once per
    set of rows: each ``Value`` is ``tag`` (field 1) then ``simple_value`` (field 2, a
    little-endian float32), so a step only writes its values into the template's float slots.
    Building ~400 ``Value`` messages through the protobuf API took about 1 ms per logged step
    on this project's 2-core machine, on the writer thread that shares the cores with training;
    this takes a few microseconds. The bytes are what ``Summary(value=[Value(tag=..,
    simple_value=..)])`` serializes to (tested)."""

    def __init__(self, layers: list[str], metrics: list[str], tags: list[str]):
        self.layers, self.metrics = layers, metrics
        parts, slots, size = [], [], 0
        for tag in tags:
            name = tag.encode()
            value = b"\x0a" + _varint(len(name)) + name + b"\x15"  # tag; simple_value follows
            record = b"\x0a" + _varint(len(value) + 4) + value  # Summary.value (repeated)
            parts.append(record + b"\0\0\0\0")
            size += len(record)
            slots.append(size)
            size += 4
        self._template = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self._slots = (np.asarray(slots, dtype=np.int64)[:, None] + np.arange(4)).ravel()

    def encode(self, values: np.ndarray) -> bytes:
        out = self._template.copy()
        with np.errstate(over="ignore"):  # beyond float32's range: inf, as protobuf stores it
            out[self._slots] = np.asarray(values, dtype="<f4").view(np.uint8)
        return out.tobytes()


def _histogram_value(tag: str, values: np.ndarray) -> bytes:
    """A serialized ``Summary.value`` holding a histogram of ``values`` (finite, non-empty).

    Bins are counted with ``bincount`` rather than ``np.histogram``: ten times cheaper for the
    few dozen values of a profile, and this runs at every logged step. The message is encoded
    by hand, as the scalars are (:class:`_ScalarSummary`): setting a ``HistogramProto``'s fields
    through the protobuf API took about 100 us per histogram, five per logged step, on the
    writer thread that shares the cores with training. The bytes are what the API serializes
    ``Summary.Value(tag=tag, histo=HistogramProto(...))`` to (tested): fields in number order,
    proto3 scalars left out when zero (+0.0), the repeated doubles packed.
    """
    lo, hi = float(values.min()), float(values.max())
    n = values.size
    bins = min(30, n)
    if hi > lo:
        idx = np.minimum(((values - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
        counts = np.bincount(idx, minlength=bins)
        edges = lo + (hi - lo) / bins * np.arange(1, bins + 1)
    else:  # all equal: one bucket, widened so TensorBoard can draw it
        counts, edges = np.array([n]), np.array([hi + 0.5 * (abs(hi) or 1.0)])
    # HistogramProto: min 1, max 2, num 3, sum 4, sum_squares 5 (double: wire type 1),
    # bucket_limit 6 and bucket 7 (packed doubles: wire type 2).
    histo = b"".join(bytes((field << 3 | 1,)) + packed
                     for field, v in enumerate((lo, hi, float(n), float(values.sum()),
                                                float(np.dot(values, values))), 1)
                     if (packed := struct.pack("<d", v)) != _ZERO)
    for field, array in ((6, edges), (7, counts)):
        packed = np.ascontiguousarray(array, dtype="<f8").tobytes()
        histo += bytes((field << 3 | 2,)) + _varint(len(packed)) + packed
    name = tag.encode()
    # Summary.Value: tag 1, histo 5 (messages: wire type 2); as Summary.value (field 1).
    value = b"\x0a" + _varint(len(name)) + name + b"\x2a" + _varint(len(histo)) + histo
    return b"\x0a" + _varint(len(value)) + value


_ZERO = struct.pack("<d", 0.0)


def _layout_value(layout: dict[str, dict[str, list[str]]]):
    """The custom-scalars layout: {category: {chart title: [tag regexes]}} as its summary."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import metadata as cs_metadata

    _, summary_pb2, _, _ = _pb()
    proto = layout_pb2.Layout(category=[
        layout_pb2.Category(title=title, chart=[
            layout_pb2.Chart(title=chart, multiline=layout_pb2.MultilineChartContent(tag=tags))
            for chart, tags in charts.items()])
        for title, charts in layout.items()])
    return summary_pb2.Summary.Value(tag=cs_metadata.CONFIG_SUMMARY_TAG,
                                     metadata=cs_metadata.create_summary_metadata(),
                                     tensor=_string_tensor(proto.SerializeToString()))


# -- hparams ---------------------------------------------------------------------------------------
#: (name, is_numeric, description): the hparams columns; the same for every run so TensorBoard,
#: which reads the experiment description of one run, describes all of them.
_HPARAMS = (
    ("model", False, "registry name, e.g. resnet20"),
    ("family", False, "plain or resnet"),
    ("depth", True, "weighted layers (6n+2)"),
    ("shortcut", False, "A (zero-pad), B (projection), none for plain nets"),
    ("dataset", False, "training data"),
    ("lr", True, "initial learning rate"),
    ("steps", True, "planned training steps"),
    ("batch_size", True, "training batch size"),
    ("seed", True, "random seed"),
)
_FINAL_DESCRIPTIONS = {
    "loss": "training loss at the end of the run",
    "accuracy": "training accuracy at the end of the run",
    "test_loss": "test loss at the end of the run",
    "test_accuracy": "test accuracy at the end of the run",
    "residual_ratio_mean": "mean over blocks of residual_ratio at the last logged step",
}


def run_hparams(run_info: Mapping[str, Any]) -> dict[str, str | float]:
    """The hparams of a run from its run.json dict (missing ones are left out).

    Model fields come from ``run_info["model"]`` (what was built), the rest from
    ``run_info["config"]`` (what was asked), so a registry default is recorded as used.
    """
    config = run_info.get("config") or {}
    model = run_info.get("model") or {}
    data = run_info.get("data")
    out: dict[str, Any] = {
        "model": model.get("name", config.get("model")),
        "family": model.get("family"),
        "depth": model.get("depth"),
        "shortcut": model.get("shortcut", config.get("shortcut")),
        "dataset": config.get("dataset", data.get("name") if isinstance(data, dict) else data),
        "lr": config.get("lr"),
        "steps": config.get("steps"),
        "batch_size": config.get("batch_size"),
        "seed": config.get("seed", run_info.get("seed")),
    }
    if out["family"] == "plain" or model.get("residual") is False:
        out["shortcut"] = "none"  # a plain net has no shortcut, whatever the option says
    numeric = {name for name, is_num, _ in _HPARAMS if is_num}
    result: dict[str, str | float] = {}
    for key, value in out.items():
        if value is None:
            continue
        if key in numeric:
            with contextlib.suppress(TypeError, ValueError):
                result[key] = float(value)
        else:
            result[key] = str(value)
    return result


def _hparams_value(tag: str, **plugin_data):
    from tensorboard.plugins.hparams import metadata as hp_metadata
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, summary_pb2, _, _ = _pb()
    content = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return summary_pb2.Summary.Value(tag=tag, metadata=hp_metadata.create_summary_metadata(content),
                                     tensor=hp_metadata.NULL_TENSOR)


def _experiment_values(hparams: Mapping[str, str | float], start_time: float) -> list:
    """Experiment description (fixed columns) and this run's session-start record."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from tensorboard.plugins.hparams import metadata as hp_metadata

    infos = []
    for name, is_num, description in _HPARAMS:
        info = api_pb2.HParamInfo(name=name, description=description,
                                  type=api_pb2.DATA_TYPE_FLOAT64 if is_num
                                  else api_pb2.DATA_TYPE_STRING)
        if name == "family":
            info.domain_discrete.extend(FAMILIES)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"final/{m}"),
                                  display_name=f"final {m}", description=_FINAL_DESCRIPTIONS[m])
               for m in FINAL_METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time)
    for key, value in hparams.items():
        v = struct_pb2.Value()
        if isinstance(value, str):
            v.string_value = value
        else:
            v.number_value = value
        start.hparams[key].CopyFrom(v)
    return [_hparams_value(hp_metadata.EXPERIMENT_TAG, experiment=experiment),
            _hparams_value(hp_metadata.SESSION_START_INFO_TAG, session_start_info=start)]


def _session_end_value(end_time: float):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from tensorboard.plugins.hparams import metadata as hp_metadata

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=end_time)
    return _hparams_value(hp_metadata.SESSION_END_INFO_TAG, session_end_info=end)


def _config_markdown(run_info: Mapping[str, Any]) -> str:
    rows = [("name", run_info.get("name", ""))]
    for section in ("model", "config"):
        for key, value in (run_info.get(section) or {}).items():
            rows.append((f"{section}.{key}", value))
    for key in ("data", "seed", "device"):
        if key in run_info:
            rows.append((key, run_info[key]))

    def cell(v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        return text.replace("|", "\\|").replace("\n", " ")

    return "| key | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)


# -- event files ----------------------------------------------------------------------------------
def _crc32c_function() -> Callable[[bytes], int]:
    """CRC-32C for the record framing: google-crc32c's C code when installed, else TensorBoard's.

    TensorBoard's fallback is pure Python (about 1 ms per 10 kB, holding the GIL), which for a
    step of ~300 scalars costs more than building the summary; ``pip install google-crc32c``
    makes it negligible.
    """
    try:
        import google_crc32c

        if google_crc32c.implementation == "c":
            return google_crc32c.value
    except ImportError:
        pass
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

    return crc32c


def _record(data: bytes, crc: Callable[[bytes], int]) -> bytes:
    """One TFRecord frame of an event file: length, masked CRC-32C of the length, the data,
    masked CRC-32C of the data (``crc``: see :func:`_crc32c_function`)."""

    def masked(b: bytes) -> int:
        c = crc(b)
        return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked(header)) + data + struct.pack("<I", masked(data))


_EVENT_FILE_IDS = iter(range(1 << 62))  # distinguishes writers of one process in one second


class _EventWriter:
    """Appends Event protos to a new event file from a thread of its own.

    TensorBoard's EventFileWriter does the same but serialises and checksums with its pure-Python
    CRC; here serialising and checksumming happen on this thread, so ``add`` only enqueues.
    Thread-safe: the run's writer thread and the renderer both add.
    """

    def __init__(self, log_dir: Path, flush_secs: float = 30.0):
        event_pb2, _, _, _ = _pb()
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DashboardError(f"cannot create {log_dir}: {e.strerror or e}") from None
        # (TensorBoard reads a run's files in name order: the counter is zero-padded so that a
        # process's 10th file of one second does not sort before its 9th.)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_EVENT_FILE_IDS):06d}")
        self.path = log_dir / name
        try:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by the thread in close()
        except OSError as e:
            raise DashboardError(f"cannot write TensorBoard events in {log_dir}: "
                                 f"{e.strerror or e}") from None
        self._crc = _crc32c_function()
        self._flush_secs = flush_secs
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._file.flush()
        self._thread = threading.Thread(target=self._run, name="gradlab-tfevents", daemon=True)
        self._thread.start()

    def _write(self, event) -> None:
        data = event if isinstance(event, bytes) else event.SerializeToString()
        self._file.write(_record(data, self._crc))

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self._flush_secs)
            except queue.Empty:
                item = "flush"
            try:
                if item is None:
                    self._file.close()
                    return
                if isinstance(item, threading.Event):
                    self._file.flush()
                    item.set()
                    continue
                if item != "flush":
                    self._write(item)
                if item == "flush" or time.monotonic() - last_flush > self._flush_secs:
                    self._file.flush()
                    last_flush = time.monotonic()
            except Exception as e:  # a full disk must not kill training; close() reports it
                self._error = e

    def add(self, event) -> None:
        """Queue an Event (or its serialized bytes) to be written (the caller must not change it
        afterwards)."""
        self._queue.put(event)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything queued so far is in the file."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait(timeout)

    def close(self, timeout: float = 60.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        if self._error is not None:
            raise DashboardError(f"writing {self.path} failed: {self._error}")


# -- depth-profile images -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Profile:
    step: int
    depth: np.ndarray
    value: np.ndarray


_RED, _BLUE = "#d62728", "#1f77b4"  # hex, not "C3"/"C0": parsing cycle names is slow
_PROFILE_NOTES = {"residual_ratio": "no residual blocks in this model",
                  "identity_gap": "no shape-preserving blocks"}


class DepthProfilePanel:
    """The depth-profile panel: one row per metric in PROFILE_METRICS, value against depth.

    Each row draws the latest profile bold (red) and earlier drawn steps fading behind it
    (blue), on one shared depth axis with the stages shaded, so a value can be read across
    metrics at the same depth. Every run gets the same rows (a note where a metric does not
    apply), so the images of a plain and a residual run line up side by side.

    The figure is built once and only its lines' data change between renders: building axes
    and ticks is most of matplotlib's cost, so reusing them makes a render ~4x cheaper. Uses
    the object API on an Agg canvas (never pyplot, which is not thread-safe).
    """

    def __init__(self, stages: tuple[tuple[str, int, int], ...], history: int = 6):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, NullLocator

        self.stages = stages
        self.fig = Figure(figsize=(7.0, 8.4), dpi=80)
        self.canvas = FigureCanvasAgg(self.fig)
        self.axes = self.fig.subplots(len(PROFILE_METRICS), 1, sharex=True)
        self.fig.subplots_adjust(left=0.13, right=0.97, top=0.91, bottom=0.07, hspace=0.12)
        self.lines: dict[str, list] = {}
        self.notes: dict[str, Any] = {}
        for row, (ax, metric) in enumerate(zip(self.axes, PROFILE_METRICS, strict=True)):
            for i, (label, lo, hi) in enumerate(stages):
                if i % 2:
                    ax.axvspan(lo - 0.5, hi + 0.5, color="0.92", lw=0)
                if row == 0:
                    ax.text((lo + hi) / 2, 1.02, label, transform=ax.get_xaxis_transform(),
                            ha="center", va="bottom", fontsize=8, color="0.3")
            # oldest first, so the newest (last) is drawn on top
            self.lines[metric] = [ax.plot([], [], lw=0.8, color=_BLUE)[0]
                                  for _ in range(history - 1)]
            self.lines[metric].append(ax.plot([], [], marker="o", ms=2.5, lw=1.6,
                                              color=_RED)[0])
            self.notes[metric] = ax.text(0.5, 0.5, _PROFILE_NOTES.get(metric, "not measured"),
                                         transform=ax.transAxes, ha="center", va="center",
                                         fontsize=9, color="0.4", visible=False)
            if metric in LOG_METRICS:
                ax.set_yscale("log")
            if metric == "residual_ratio":  # ||F(x)|| = ||x||
                self.notes["reference"] = ax.axhline(1.0, color="0.4", ls="--", lw=0.8)
            ax.yaxis.set_minor_locator(NullLocator())  # minor ticks cost most of the drawing
            ax.set_ylabel(metric.replace("_", " ") + (" (log)" if metric in LOG_METRICS else ""),
                          fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, lw=0.5)
        self.axes[-1].xaxis.set_major_locator(MaxNLocator(10, integer=True))
        self.axes[-1].set_xlabel("depth (module index in forward order)", fontsize=8)
        self.title = self.fig.suptitle("", fontsize=10)

    def render(self, history: Mapping[str, list[_Profile]], title: str) -> bytes:
        """Draw the profiles (per metric, oldest first; the last is bold); returns PNG bytes."""
        steps = sorted({p.step for ps in history.values() for p in ps})
        for ax, metric in zip(self.axes, PROFILE_METRICS, strict=True):
            lines, profiles = self.lines[metric], history.get(metric, [])[-len(self.lines[metric]):]
            older, n = lines[:-1], len(profiles)
            for line in lines:
                line.set_visible(False)
            for i, p in enumerate(profiles):
                line = lines[-1] if i == n - 1 else older[len(older) - (n - 1) + i]
                value = np.where(p.value > 0, p.value, np.nan) if metric in LOG_METRICS \
                    else p.value
                line.set_data(p.depth, value)
                line.set_visible(True)
                if i < n - 1:
                    line.set_alpha(0.15 + 0.5 * (i + 1) / n)
            self.notes[metric].set_visible(not profiles)
            if metric == "residual_ratio":
                self.notes["reference"].set_visible(bool(profiles))
            ax.tick_params(axis="y", left=bool(profiles), labelleft=bool(profiles))
            ax.relim(visible_only=True)
            ax.autoscale_view()
        shown = f" (faded: steps {steps[0]}-{steps[-2]})" if len(steps) > 1 else ""
        self.title.set_text(title + shown)
        buf = io.BytesIO()
        try:  # a 64-colour palette PNG: a third of the bytes, no visible loss for line plots
            from PIL import Image
        except ImportError:
            self.fig.savefig(buf, format="png")
            return buf.getvalue()
        self.canvas.draw()
        image = Image.frombuffer("RGBA", self.canvas.get_width_height(), self.canvas.buffer_rgba())
        image.convert("RGB").quantize(64, method=Image.Quantize.FASTOCTREE).save(buf, format="png")
        return buf.getvalue()


def render_depth_profile(history: Mapping[str, list[_Profile]],
                         stages: tuple[tuple[str, int, int], ...], title: str) -> bytes:
    """Draw one depth-profile panel (see :class:`DepthProfilePanel`); returns PNG bytes."""
    return DepthProfilePanel(stages).render(history, title)


class _Renderer:
    """A thread that draws depth-profile panels and writes them as image summaries.

    Jobs are few (at most ``max_images`` per run), so the queue is unbounded; the thread keeps
    the last few profiles of each metric to draw the fading history.
    """

    HISTORY = 6
    TAG = "depth_profile"

    def __init__(self, writer: _EventWriter, title: str):
        self._writer = writer
        self._title = title
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._history: dict[str, list[_Profile]] = {}
        self._panel: DepthProfilePanel | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradlab-dashboard-render",
                                        daemon=True)
        self._thread.start()

    def submit(self, step: int, profiles: dict[str, tuple[np.ndarray, np.ndarray]],
               stages: tuple[tuple[str, int, int], ...]) -> None:
        self._jobs.put((step, profiles, stages))

    def _run(self) -> None:
        event_pb2, summary_pb2, _, _ = _pb()
        while (job := self._jobs.get()) is not None:
            step, profiles, stages = job
            try:
                for metric, (depth, value) in profiles.items():
                    hist = self._history.setdefault(metric, [])
                    hist.append(_Profile(step, depth, value))
                    del hist[:-self.HISTORY]
                if self._panel is None or self._panel.stages != stages:
                    self._panel = DepthProfilePanel(stages, self.HISTORY)
                png = self._panel.render(self._history,
                                         f"{self._title}depth profile at step {step}")
                self._writer.add(event_pb2.Event(
                    wall_time=time.time(), step=step,
                    summary=summary_pb2.Summary(value=[_image_value(self.TAG, png)])))
            except Exception as e:  # a drawing failure must not stop training; kept for close()
                self.error = e

    def close(self, timeout: float = 120.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


def _group_order(group: str) -> tuple[int, int]:
    """stem, stage 1, stage 2, ..., head."""
    stage = int(group[6:]) if group.startswith("stage ") else 0
    return {"stem": 0, "head": 2}.get(group, 1), stage


class Dashboard:
    """Writes a run's measurements to TensorBoard event files under ``log_dir``.

    Tags are ``<metric>/<layer>`` (``residual_ratio/layer2.3``) so TensorBoard's tag filter
    selects a metric or a layer; model-wide scalars are ``<metric>`` alone (``loss``).
    All values arrive already on the host: writing never touches the device. See the module
    docstring for the layout, depth profiles and hparams this writes.

    Args:
        log_dir: the run's TensorBoard directory (``runs/<name>/tb``).
        run_info: the run.json dict; its name, model and config become hparams, and
            ``config["steps"]`` spreads the depth-profile images over the run.
        max_images: depth-profile images per metric for the whole run (0: none).
        flush_secs: how often the event writer flushes on its own.
        resumed_at: the step a resumed run continues from (0: it starts over). The new event
            file then opens with a restart marker at that step (``SessionLog.START``, as
            TensorFlow's writers do), so TensorBoard drops what earlier files hold from that
            step on (the steps trained again) instead of drawing both; and the images already
            drawn before it count against ``max_images``.
    """

    def __init__(self, log_dir: Path, run_info: dict | None = None, *, max_images: int = 50,
                 flush_secs: float = 30.0, resumed_at: int | None = None):
        self.log_dir = Path(log_dir)
        self.run_info = run_info or {}
        self.max_images = max(0, int(max_images))
        self._writer = _EventWriter(self.log_dir, flush_secs)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._layers: dict[str, set[str]] = {}  # metric -> layers seen ("" for model-wide)
        self._depth: dict[str, int] = {}  # layer -> depth
        self._first_stage_depth: int | None = None
        self._layout: dict | None = None
        self._stages: tuple[tuple[str, int, int], ...] = ()
        self._renderer: _Renderer | None = None
        self._images = 0
        self._next_image_step: float | None = None
        self._last: tuple[int, dict] | None = None  # last step and its profiles, for close()
        self._scalars: _ScalarSummary | None = None  # the last step's rows, encoded
        self._last_rendered = -1
        self._rr_mean: float | None = None
        self._closed = False
        # The planned length: the run's resolved total (also for --epochs), else its --steps.
        steps = (self.run_info.get("total_steps")
                 or (self.run_info.get("config") or {}).get("steps"))
        self._image_stride = (float(steps) / max(1, self.max_images - 1)
                              if isinstance(steps, (int, float)) and steps > 0 else None)
        now = time.time()
        # A session marker first in the file, before this session's own step-0 values.
        # TensorBoard's server-side loader takes a run's first SessionLog.START for the start
        # of its first session and every later one for a restart, at which it drops the
        # earlier events at or after the marker's step (its classic loader drops them at every
        # marker). A fresh run writes one at step 0; a resumed session writes two at its step,
        # so that the restart is seen also in a run whose first session wrote none (written by
        # gradlab before this marker existed), and is harmless otherwise.
        event_pb2, _, _, _ = _pb()
        marker = event_pb2.Event(wall_time=now, step=int(resumed_at or 0),
                                 session_log=event_pb2.SessionLog(
                                     status=event_pb2.SessionLog.START))
        for _ in range(1 if resumed_at is None else 2):
            self._writer.add(marker)
        if resumed_at is not None and resumed_at > 0 and self._image_stride is not None:
            # The images of the steps before (see _due), as the uninterrupted run drew them.
            drawn = math.floor((resumed_at - 1) / self._image_stride) + 1
            self._images = min(drawn, max(0, self.max_images - 1))
            self._next_image_step = drawn * self._image_stride
        values = _experiment_values(run_hparams(self.run_info), now)
        if self.run_info:
            values.append(_text_value("run/config", _config_markdown(self.run_info)))
        self._write(0, values, wall_time=now)

    def _write(self, step: int, values: list, wall_time: float | None = None) -> None:
        event_pb2, summary_pb2, _, _ = _pb()
        self._writer.add(event_pb2.Event(wall_time=wall_time or time.time(), step=step,
                                               summary=summary_pb2.Summary(value=values)))

    def log(self, step: int, columns: dict[str, np.ndarray]) -> None:
        """Write one logged step (host arrays ``layer, depth, metric, value``).

        Cost is a few microseconds per row: one Event for all scalars, a histogram per profile
        metric, and, at most ``max_images`` times per run, a hand-off to the renderer thread.
        """
        layer, metric, value = columns["layer"], columns["metric"], columns["value"]
        if len(value) == 0:
            return
        event_pb2, _, _, _ = _pb()
        with self._lock:
            if self._closed:
                return
            layers, metrics = layer.tolist(), metric.tolist()
            scalars = self._scalars
            if scalars is None or scalars.layers != layers or scalars.metrics != metrics:
                # New rows (the first step, or a step that measured other layers).
                tags = [f"{m}/{la}" if la else m for m, la in zip(metrics, layers, strict=True)]
                if not self._seen.issuperset(tags):
                    self._learn(tags, layers, metrics, columns["depth"].tolist(), step)
                scalars = self._scalars = _ScalarSummary(layers, metrics, tags)
            hists = []
            profiles = self._profiles(metric, columns["depth"], value)
            for name, (_, v) in profiles.items():
                v = v[np.isfinite(v)]
                if name in LOG_METRICS:
                    v = np.log10(v[v > 0])
                    name = f"log10_{name}"
                if v.size:
                    hists.append(_histogram_value(f"{name}/across_layers", v))
            # One Event: its step and time, then the scalars and histograms as one Summary
            # (serialized messages concatenate into the merged message).
            summary = scalars.encode(value) + b"".join(hists)
            self._writer.add(event_pb2.Event(wall_time=time.time(), step=step)
                             .SerializeToString() + b"\x2a" + _varint(len(summary)) + summary)
            if profiles:
                self._last = (step, profiles)
                rr = profiles.get("residual_ratio")
                if rr is not None and np.isfinite(rr[1]).any():
                    self._rr_mean = float(np.nanmean(rr[1]))
                if self._due(step):
                    self._render(step, profiles)

    @staticmethod
    def _profiles(metric: np.ndarray, depth: np.ndarray,
                  value: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for name in PROFILE_METRICS:
            mask = metric == name
            if mask.any():
                d, v = depth[mask], value[mask].astype(np.float64)
                if (d[1:] < d[:-1]).any():  # rows normally arrive in depth order already
                    order = np.argsort(d, kind="stable")
                    d, v = d[order], v[order]
                out[name] = (d, v)
        return out

    def _learn(self, tags: list[str], layers: list[str], metrics: list[str], depths: list[int],
               step: int) -> None:
        """Register new tags; rewrite the layout when they add a chart (rare: first steps)."""
        for tag, la, m, d in zip(tags, layers, metrics, depths, strict=True):
            if tag in self._seen:
                continue
            self._seen.add(tag)
            self._layers.setdefault(m, set()).add(la)
            if la:
                self._depth[la] = int(d)
        stage_depths = [d for la, d in self._depth.items() if layer_stage(la) is not None]
        self._first_stage_depth = min(stage_depths) if stage_depths else None
        layout = self._build_layout()
        if layout != self._layout:
            self._layout = layout
            self._stages = self._stage_spans()
            self._write(step, [_layout_value(layout)])

    def _group(self, layer: str) -> str:
        """Chart a layer belongs to: ``stage K``, or ``stem``/``head`` around the stages."""
        k = layer_stage(layer)
        if k is not None:
            return f"stage {k}"
        if self._first_stage_depth is None:
            return "layers"
        return "stem" if self._depth.get(layer, 0) < self._first_stage_depth else "head"

    def _stage_spans(self) -> tuple[tuple[str, int, int], ...]:
        spans: dict[str, list[int]] = {}
        for la, d in self._depth.items():
            spans.setdefault(self._group(la), []).append(d)
        return tuple(sorted(((g, min(ds), max(ds)) for g, ds in spans.items()),
                            key=lambda s: s[1]))

    def _build_layout(self) -> dict[str, dict[str, list[str]]]:
        model_wide = sorted(m for m, ls in self._layers.items() if "" in ls)
        charts = {title: [f"^{re.escape(m)}$" for m in ms] for title, ms in _MODEL_CHARTS.items()}
        covered = {m for ms in _MODEL_CHARTS.values() for m in ms}
        charts.update({m: [f"^{re.escape(m)}$"] for m in model_wide if m not in covered})
        layout: dict[str, dict[str, list[str]]] = {"model": charts}
        per_layer = [m for m, ls in self._layers.items() if ls - {""}]
        order = {m: i for i, m in enumerate(_METRIC_ORDER)}
        for m in sorted(per_layer, key=lambda m: (order.get(m, len(order)), m)):
            groups: dict[str, list[str]] = {}
            for la in self._layers[m] - {""}:
                groups.setdefault(self._group(la), []).append(la)
            metric_charts = {}
            for g in sorted(groups, key=_group_order):
                if g.startswith("stage "):
                    regex = f"^{re.escape(m)}/layer{g[6:]}(\\.|$)"
                else:
                    names = "|".join(re.escape(la) for la in sorted(groups[g], key=self._depth.get))
                    regex = f"^{re.escape(m)}/({names})$"
                metric_charts[g] = [regex]
            layout[m] = metric_charts
        return layout

    def _due(self, step: int) -> bool:
        """Whether this step gets depth-profile images: evenly over the planned steps.

        Without a planned length, steps 0, 1, 2, 4, 8, ... (dense early, where training changes
        fastest). One image per metric is kept back for the final step (see close()).
        """
        if self._images >= self.max_images - 1:
            return False
        nxt = self._next_image_step
        if nxt is not None and step < nxt:
            return False
        if self._image_stride is not None:
            self._next_image_step = (math.floor(step / self._image_stride) + 1) * self._image_stride
        else:
            self._next_image_step = max(1, 2 * step)
        return True

    def _render(self, step: int, profiles: dict) -> None:
        if self._renderer is None:
            name = self.run_info.get("name")
            self._renderer = _Renderer(self._writer, f"{name}: " if name else "")
        self._renderer.submit(step, profiles, self._stages)
        self._images += 1
        self._last_rendered = step

    def flush(self) -> None:
        """Hand everything written so far to the event file (images still drawing excepted)."""
        self._writer.flush()

    def close(self, final: dict[str, float] | None = None, *, status: str | None = None) -> None:
        """Draw the last profiles, write the hparams metrics, and close the event file.

        Args:
            final: the run's final scalars (loss, accuracy, test_loss, test_accuracy,
                residual_ratio_mean; the last is taken from the last logged step when absent).
            status: the run's status (completed | failed | interrupted); by default
                ``completed`` when ``final`` is given. Only a completed run records its end in
                hparams: TensorBoard keeps the first end record of a run, so a failed run that
                is resumed later can still end as completed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if status is None:
                status = "completed" if final else "interrupted"
            last_step = self._last[0] if self._last else 0
            if self._last is not None and self._last[0] != self._last_rendered \
                    and self._images < self.max_images:
                self._render(*self._last)
            if self._renderer is not None:
                self._renderer.close()
                if self._renderer.error is not None:  # the run's numbers matter more: warn only
                    warnings.warn(f"gradlab dashboard: drawing depth profiles failed: "
                                  f"{self._renderer.error!r}", RuntimeWarning, stacklevel=2)
            metrics = {k: float(v) for k, v in (final or {}).items()
                       if isinstance(v, (int, float)) and math.isfinite(v)}
            if "residual_ratio_mean" not in metrics and self._rr_mean is not None:
                metrics["residual_ratio_mean"] = self._rr_mean
            _, summary_pb2, _, _ = _pb()
            values = [summary_pb2.Summary.Value(tag=f"final/{k}", simple_value=v)
                      for k, v in metrics.items()]
            if status == "completed":
                values.append(_session_end_value(time.time()))
            if values:
                self._write(last_step, values)
            self._writer.close()


# -- the report -----------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"


def write_report(log_dir: Path, verdicts_markdown: str,
                 figures: list[tuple[str, str, bytes]]) -> None:
    """Write a suite's report into TensorBoard: the verdict table as text, figures as images.

    Each call is one step (0, 1, 2, ... by the event files already there), so a report written
    again after more runs appears as a later step rather than replacing the earlier one.

    Args:
        log_dir: where to write (a suite's runs directory's ``report`` folder, say); created.
        verdicts_markdown: markdown (a table of claims and verdicts); the figure captions are
            appended to it.
        figures: (name, caption, PNG bytes); each becomes the image tag ``report/<name>``.

    Raises:
        DashboardError: a figure is not a PNG, or the directory cannot be written.
    """
    log_dir = Path(log_dir)
    images, captions = [], []
    for name, caption, png in figures:
        tag = f"report/{_safe_name(name)}"
        try:
            images.append(_image_value(tag, png, caption))
        except DashboardError:
            raise DashboardError(f"report figure {name!r} is not a PNG image") from None
        captions.append(f"- **{tag}**: {caption}")
    text = verdicts_markdown.rstrip()
    if captions:
        text += "\n\n**Figures** (Images tab)\n\n" + "\n".join(captions)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        step = len(list(log_dir.glob(_EVENT_GLOB)))
        writer = _EventWriter(log_dir)
    except OSError as e:
        raise DashboardError(f"cannot write the report to {log_dir}: {e.strerror or e}") from None
    event_pb2, summary_pb2, _, _ = _pb()
    writer.add(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(
        value=[_text_value("report/verdicts", text, "claims tested and their verdicts"),
               *images])))
    writer.close()


# -- serving --------------------------------------------------------------------------------------
def find_logdirs(path: Path) -> list[Path]:
    """The directories under ``path`` (itself included) that hold TensorBoard event files.

    Raises:
        DashboardError: ``path`` does not exist, is not a directory, or holds no runs (neither a
            run.json nor an event file anywhere under it).
    """
    path = Path(path)
    if not path.exists():
        raise DashboardError(f"{path}: no such directory")
    if not path.is_dir():
        raise DashboardError(f"{path}: not a directory")
    found, has_run = set(), False
    for root, _, files in os.walk(path):
        if "run.json" in files:
            has_run = True
        if any(f.startswith("events.out.tfevents.") for f in files):
            found.add(Path(root))
    if not found and not has_run:
        raise DashboardError(f"{path}: no runs here (no run.json or TensorBoard event files)")
    return sorted(found)


class DashboardServer:
    """A TensorBoard server running in this process (see :func:`launch`); stop() ends it."""

    def __init__(self, server, url: str, thread: threading.Thread):
        self._server = server
        self.url = url
        self._thread = thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        self._server = None

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(logdir: Path, *, host: str = "127.0.0.1", port: int = 0,
           reload_interval: float = 5.0, max_images: int = 100) -> DashboardServer:
    """Start TensorBoard in-process over ``logdir``; returns once it accepts connections.

    Uses TensorBoard's Python loader (``--load_fast=false``): it runs in this process, so
    stopping the server leaves no data-server subprocess behind. Keeps up to ``max_images``
    images per tag (TensorBoard's default of 10 would hide most depth profiles).

    Raises:
        DashboardError: no runs under ``logdir`` (see :func:`find_logdirs`), or the port is taken.
    """
    find_logdirs(logdir)
    if not 0 <= int(port) <= 65535:
        raise DashboardError(f"port {port} is not a TCP port (0-65535; 0: any free one)")
    import socket

    try:  # (werkzeug reports an address it cannot bind by printing and exiting the process)
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise DashboardError(f"cannot start TensorBoard on {host}:{port}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    from tensorboard import program

    servers: list = []

    def make_server(app, flags):
        server = program.WerkzeugServer(app, flags)
        servers.append(server)
        return server

    tb = program.TensorBoard(server_class=make_server)
    tb.configure(argv=["", "--logdir", str(Path(logdir).resolve()), "--host", host,
                       "--port", str(int(port)), "--load_fast", "false",
                       "--reload_interval", str(float(reload_interval)),
                       "--samples_per_plugin", f"images={int(max_images)}",
                       "--window_title", f"gradlab: {Path(logdir).resolve().name}"])
    try:
        server = tb._make_server()  # launch() hides the server; we need it to stop cleanly
    except program.TensorBoardServerException as e:
        raise DashboardError(f"cannot start TensorBoard: {e.msg}") from None
    except (OSError, SystemExit) as e:  # (werkzeug: it printed why, then exited)
        why = f": {e.strerror or e}" if isinstance(e, OSError) else " (see above)"
        raise DashboardError(f"cannot start TensorBoard on {host}:{port}{why}") from None
    thread = threading.Thread(target=server.serve_forever, name="gradlab-tensorboard",
                              daemon=True)
    thread.start()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_port}/"
    return DashboardServer(server, url, thread)


def serve(logdir: Path, *, host: str = "127.0.0.1", port: int = 0,
          on_ready: Callable[[str], None] | None = None, reload_interval: float = 5.0,
          stop: threading.Event | None = None) -> None:
    """Serve TensorBoard over ``logdir`` until Ctrl-C (or ``stop`` is set), then shut down.

    Runs are named by their path under ``logdir`` (``resnet56-digits-s0/tb``; a suite's report
    is ``report``).

    Args:
        logdir: a runs directory (a suite's) or one run; every event file below it is a run.
        host: interface to bind; loopback by default, as the dashboard has no authentication.
        port: TCP port; 0 picks a free one.
        on_ready: called with the URL once the server accepts connections.
        reload_interval: seconds between rescans, so running runs update live (0: load once).
            TensorBoard's reloader is a daemon thread it offers no way to stop; it ends with
            the process, which for ``gradlab dashboard`` is right after this returns.
        stop: an event that ends serving when set (for callers without a terminal).

    Raises:
        DashboardError: no runs under ``logdir``, or the server cannot start.
    """
    with launch(logdir, host=host, port=port, reload_interval=reload_interval) as server:
        if on_ready is not None:
            on_ready(server.url)
        stop = stop or threading.Event()
        try:
            while not stop.wait(0.5):  # short waits keep Ctrl-C responsive
                pass
        except KeyboardInterrupt:
            pass

