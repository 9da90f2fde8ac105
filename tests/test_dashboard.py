"""The TensorBoard dashboard, read back with TensorBoard's own reader and served by TensorBoard.

Two small fake runs (plain20- and resnet20-shaped layer names, a few logged steps) are written
once per module; the tests read them with ``EventAccumulator`` and through the HTTP data API of
a real TensorBoard server on a free loopback port.
"""

from __future__ import annotations

import io
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gradlab.dashboard import (
    FINAL_METRICS,
    PROFILE_METRICS,
    Dashboard,
    DashboardError,
    find_logdirs,
    launch,
    layer_stage,
    run_hparams,
    serve,
    write_report,
)

# TensorBoard's vendored bleach warns about its own html5lib sanitizer when the server starts.
pytestmark = pytest.mark.filterwarnings("ignore:html5lib's sanitizer:DeprecationWarning")

STEPS, EVERY = 40, 10
FINAL = {"plain": {"loss": 0.9, "accuracy": 0.7, "test_loss": 1.0, "test_accuracy": 0.65},
         "resnet": {"loss": 0.4, "accuracy": 0.9, "test_loss": 0.5, "test_accuracy": 0.85,
                    "residual_ratio_mean": 0.2 + 0.01 * STEPS}}  # last step, mean of blocks


def fake_columns(family: str, n: int, step: int, *, test: bool = False) -> dict[str, np.ndarray]:
    """Rows as the Probe emits them for a CIFAR ResNet/plain net with n blocks per stage."""
    rng = np.random.default_rng(step)
    rows: list[tuple[str, int, str, float]] = []
    depth = 0

    def module(name: str, bn: bool) -> None:
        nonlocal depth
        rows.append((name, depth, "grad_norm", rng.uniform(0.1, 1) * 0.9 ** depth))
        rows.append((name, depth, "weight_norm", 2.0))
        if bn:
            rows.append((name, depth, "response_std", rng.uniform(0.5, 2)))
            rows.append((name, depth, "response_grad_norm", 10.0 ** (-depth / 10)))
        depth += 1

    module("conv1", False)
    module("bn1", True)
    for k in (1, 2, 3):
        for i in range(n):
            block = f"layer{k}.{i}"
            for sub in ("conv1", "bn1", "conv2", "bn2"):
                module(f"{block}.{sub}", sub.startswith("bn"))
            if family == "resnet":
                rows.append((block, depth, "residual_ratio", 0.1 * (i + 1) + 0.01 * step))
                rows.append((block, depth, "residual_cosine", 0.1))
            if not (i == 0 and k > 1):
                rows.append((block, depth, "identity_gap", rng.uniform(0.1, 1)))
            depth += 1
    module("fc", True)
    scalars = {"loss": 2.3 / (1 + step), "accuracy": step / 100, "lr": 0.1, "images_per_s": 1e3}
    if test:
        scalars.update(test_loss=2.0 / (1 + step), test_accuracy=step / 120)
    rows += [("", -1, m, v) for m, v in scalars.items()]
    layer, d, metric, value = zip(*rows, strict=True)
    return {"layer": np.array(layer, dtype=object), "depth": np.array(d, dtype=np.int32),
            "metric": np.array(metric, dtype=object), "value": np.array(value, dtype=np.float64)}


def run_info(family: str) -> dict:
    name = f"{family}20"
    return {"schema_version": 1, "name": name, "status": "running",
            "config": {"model": name, "dataset": "digits", "steps": STEPS, "lr": 0.1,
                       "batch_size": 64, "seed": 3, "every": EVERY, "shortcut": "A"},
            "model": {"name": name, "family": family, "depth": 20,
                      "residual": family == "resnet", "shortcut": "A", "parameters": 270_000},
            "data": "digits", "seed": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for family in ("plain", "resnet"):
        info = run_info(family)
        run = root / info["name"]
        run.mkdir()
        (run / "run.json").write_text(json.dumps(info))
        dash = Dashboard(run / "tb", info, max_images=3)
        for step in range(0, STEPS + 1, EVERY):
            dash.log(step, fake_columns(family, 3, step, test=step % 20 == 0))
        dash.flush()
        final = dict(FINAL[family])
        final.pop("residual_ratio_mean", None)  # resnet's comes from its last logged step
        dash.close(final, status="completed")
    return root


def accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                    "tensors": 0})
    ea.Reload()
    return ea


def hparams_data(ea) -> dict:
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}


# -- the event files -------------------------------------------------------------------------------
def test_layer_stage():
    assert layer_stage("layer2.3.bn1") == 2 and layer_stage("layer3") == 3
    assert layer_stage("conv1") is None and layer_stage("layer1x") is None


def test_scalars_are_tagged_metric_slash_layer(runs):
    ea = accumulator(runs / "resnet20" / "tb")
    tags = set(ea.Tags()["scalars"])
    assert {"residual_ratio/layer2.1", "grad_norm/layer1.0.conv1", "response_std/layer3.2.bn2",
            "identity_gap/layer3.1", "grad_norm/conv1", "response_grad_norm/fc", "loss",
            "accuracy", "lr", "images_per_s", "test_loss", "test_accuracy"} <= tags
    assert not any(t.startswith("/") or t.endswith("/") for t in tags)
    ratio = ea.Scalars("residual_ratio/layer2.1")
    assert [e.step for e in ratio] == list(range(0, STEPS + 1, EVERY))
    assert ratio[-1].value == pytest.approx(0.2 + 0.01 * STEPS, rel=1e-6)  # float32 on disk
    assert [e.step for e in ea.Scalars("test_loss")] == [0, 20, 40]
    plain = set(accumulator(runs / "plain20" / "tb").Tags()["scalars"])
    assert not any(t.startswith("residual_ratio/") for t in plain)
    assert "identity_gap/layer1.0" in plain


def _layout(ea) -> dict[str, dict[str, list[str]]]:
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    events = ea.Tensors(metadata.CONFIG_SUMMARY_TAG)
    proto = layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0])
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in proto.category}


def test_custom_scalar_layout_has_a_chart_per_metric_and_stage(runs):
    ea = accumulator(runs / "resnet20" / "tb")
    layout = _layout(ea)
    tags = ea.Tags()["scalars"]
    assert list(layout)[0] == "model"
    assert layout["model"]["loss"] == ["^loss$", "^test_loss$"]
    assert list(layout["grad_norm"]) == ["stem", "stage 1", "stage 2", "stage 3", "head"]
    assert list(layout["residual_ratio"]) == ["stage 1", "stage 2", "stage 3"]
    for metric in ("residual_ratio", "residual_cosine", "identity_gap", "response_std",
                   "response_grad_norm", "grad_norm", "weight_norm"):
        assert metric in layout

    def matched(regexes: list[str]) -> set[str]:
        return {t for t in tags if any(re.search(r, t) for r in regexes)}

    assert matched(layout["residual_ratio"]["stage 2"]) == {
        "residual_ratio/layer2.0", "residual_ratio/layer2.1", "residual_ratio/layer2.2"}
    assert matched(layout["grad_norm"]["stem"]) == {"grad_norm/conv1", "grad_norm/bn1"}
    assert matched(layout["grad_norm"]["head"]) == {"grad_norm/fc"}
    assert len(matched(layout["grad_norm"]["stage 3"])) == 12  # 3 blocks x conv1/bn1/conv2/bn2
    # every per-layer scalar is on exactly one chart of its metric's category
    for tag in tags:
        metric, _, layer = tag.partition("/")
        if layer and not tag.startswith("final/"):
            hits = [c for c, rx in layout[metric].items() if matched(rx) & {tag}]
            assert len(hits) == 1, (tag, hits)
    # the plain run's layout has the same per-stage regexes (so TensorBoard merges the two)
    plain = _layout(accumulator(runs / "plain20" / "tb"))
    assert plain["grad_norm"] == layout["grad_norm"] and "residual_ratio" not in plain


def test_depth_profiles_histograms_and_images(runs):
    ea = accumulator(runs / "resnet20" / "tb")
    hist_tags = set(ea.Tags()["histograms"])
    assert hist_tags == {"residual_ratio/across_layers", "identity_gap/across_layers",
                         "response_std/across_layers", "log10_response_grad_norm/across_layers",
                         "log10_grad_norm/across_layers"}
    ratio = ea.Histograms("residual_ratio/across_layers")
    assert [h.step for h in ratio] == list(range(0, STEPS + 1, EVERY))
    last = ratio[-1].histogram_value
    assert last.num == 9 and sum(last.bucket) == 9  # one count per block
    assert last.min == pytest.approx(0.1 + 0.01 * STEPS)
    assert last.max == pytest.approx(0.3 + 0.01 * STEPS)
    images = ea.Images("depth_profile")
    assert 2 <= len(images) <= 3 and images[-1].step == STEPS  # bounded, and the final step
    from PIL import Image

    png = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert png.format == "PNG" and png.size == (images[-1].width, images[-1].height)
    assert "depth_profile" in accumulator(runs / "plain20" / "tb").Tags()["images"]


def test_image_schedule_is_bounded_and_spread(tmp_path):
    dash = Dashboard(tmp_path, {"config": {"steps": 1000}}, max_images=11)
    due = []
    for step in range(0, 1001):
        if dash._due(step):
            due.append(step)
            dash._images += 1  # what _render counts
    assert len(due) == 10 and due[0] == 0 and due[-1] >= 900  # the 11th is kept for the end
    assert max(np.diff(due)) <= 101
    dash.close()
    unknown = Dashboard(tmp_path / "u", {}, max_images=50)
    assert [s for s in range(0, 100) if unknown._due(s)] == [0, 1, 2, 4, 8, 16, 32, 64]
    few = Dashboard(tmp_path / "f", {"config": {"steps": 1000}}, max_images=1)
    assert not any(few._due(s) for s in range(1001))  # the one image is the final step's
    few.close()
    unknown.close()


def test_hparams_in_the_runs_own_log_dir(runs):
    from tensorboard.plugins.hparams import api_pb2

    for family in ("plain", "resnet"):
        tb = runs / f"{family}20" / "tb"
        assert [p for p in tb.iterdir() if p.is_dir()] == []  # no sub-run
        ea = accumulator(tb)
        data = hparams_data(ea)
        start = data["_hparams_/session_start_info"].session_start_info
        hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
        assert hp == {"model": f"{family}20", "family": family, "depth": 20,
                      "shortcut": "A" if family == "resnet" else "none", "dataset": "digits",
                      "lr": 0.1, "steps": STEPS, "batch_size": 64, "seed": 3}
        experiment = data["_hparams_/experiment"].experiment
        assert [m.name.tag for m in experiment.metric_infos] == [f"final/{m}"
                                                                 for m in FINAL_METRICS]
        family_info = next(h for h in experiment.hparam_infos if h.name == "family")
        assert [v.string_value for v in family_info.domain_discrete.values] == ["plain", "resnet"]
        end = data["_hparams_/session_end_info"].session_end_info
        assert end.status == api_pb2.STATUS_SUCCESS
        finals = {t.removeprefix("final/"): ea.Scalars(t)[-1].value
                  for t in ea.Tags()["scalars"] if t.startswith("final/")}
        assert finals == pytest.approx(FINAL[family], rel=1e-6)
        assert ea.Scalars("final/loss")[-1].step == STEPS


def test_interrupted_run_records_no_end(tmp_path):
    info = run_info("resnet")
    dash = Dashboard(tmp_path, info, max_images=0)
    dash.log(0, fake_columns("resnet", 1, 0))
    dash.close(None)
    ea = accumulator(tmp_path)
    assert "_hparams_/session_start_info" in hparams_data(ea)
    assert "_hparams_/session_end_info" not in hparams_data(ea)
    assert ea.Tags()["images"] == []
    assert [t for t in ea.Tags()["scalars"] if t.startswith("final/")] == [
        "final/residual_ratio_mean"]


def test_run_hparams_from_partial_info():
    assert run_hparams({}) == {}
    hp = run_hparams({"config": {"model": "plain56", "lr": "0.05"}, "seed": 1,
                      "model": {"family": "plain", "residual": False}})
    assert hp == {"model": "plain56", "family": "plain", "shortcut": "none", "lr": 0.05,
                  "seed": 1.0}


def test_log_ignores_empty_steps_and_calls_after_close(tmp_path):
    dash = Dashboard(tmp_path, None)
    empty = {k: v[:0] for k, v in fake_columns("plain", 1, 0).items()}
    dash.log(0, empty)
    dash.close()
    dash.log(1, fake_columns("plain", 1, 1))  # no error, nothing written
    dash.close()
    assert accumulator(tmp_path).Tags()["scalars"] == []



@pytest.mark.parametrize("values", [
    [0.5, -1.25, 3.0, 1e-3, 2.0], [0.0, 1.0], [2.5], [0.0], [-0.0, -0.0], [1e150, -1e150, 0.0],
    list(np.random.default_rng(0).standard_normal(55)), [0.1] * 40])
def test_histograms_are_encoded_as_the_protobuf_api_would(values):
    """_histogram_value's bytes are exactly what the protobuf API serializes for the same
    histogram (zero fields left out, -0.0 kept, one bucket, more values than buckets)."""
    from tensorboard.compat.proto import summary_pb2

    from gradlab.dashboard import _histogram_value

    v = np.asarray(values, dtype=np.float64)
    got = _histogram_value("residual_ratio/across_layers", v)
    parsed = summary_pb2.Summary.FromString(got).value[0]
    h = parsed.histo
    lo, hi = float(v.min()), float(v.max())
    assert (h.min, h.max, h.num) == (lo, hi, float(v.size))
    assert h.sum == float(v.sum()) and h.sum_squares == float(np.dot(v, v))
    assert sum(h.bucket) == v.size and len(h.bucket) == len(h.bucket_limit)
    assert len(h.bucket) == (min(30, v.size) if hi > lo else 1)
    if hi > lo:
        assert h.bucket_limit[-1] == pytest.approx(hi) and list(h.bucket_limit) == sorted(
            h.bucket_limit)
    want = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag="residual_ratio/across_layers", histo=summary_pb2.HistogramProto(
            min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
            bucket_limit=list(h.bucket_limit), bucket=list(h.bucket)))])
    assert got == want.SerializeToString()


def test_scalars_are_encoded_as_the_protobuf_api_would(tmp_path):
    """The pre-encoded scalar Summary parses back to exactly the messages the protobuf API
    builds (tags of any length and script, float32 rounding, inf, NaN, -0, overflow), also when
    the rows change from one step to the next."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from gradlab.dashboard import _ScalarSummary, _varint

    assert [_varint(n) for n in (0, 1, 127, 128, 300, 2**21)] == [
        b"\0", b"\1", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x01"]
    tags = ["loss", "grad_norm/layer1.0.conv1", "r\u00e9sum\u00e9/\u5c42", "x" * 200, "y" * 20000]
    values = np.array([0.1, -0.0, np.inf, np.nan, 1e300])
    got = summary_pb2.Summary.FromString(_ScalarSummary(tags, tags, tags).encode(values))
    want = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v)
                                      for t, v in zip(tags, values.tolist(), strict=True)])
    assert len(got.value) == len(tags)
    for g, w in zip(got.value, want.value, strict=True):
        assert g.tag == w.tag and np.float32(g.simple_value).tobytes() == \
            np.float32(w.simple_value).tobytes() or (np.isnan(g.simple_value)
                                                    and np.isnan(w.simple_value))
    assert got.value[4].simple_value == np.inf  # 1e300 overflows float32, as protobuf stores it

    dash = Dashboard(tmp_path, None)
    cols = fake_columns("resnet", 1, 1)
    fewer = {k: v[:-3] for k, v in cols.items()}
    for step, c in enumerate([cols, cols, fewer, cols]):
        dash.log(step, c)
    dash.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    events = [event_pb2.Event.FromString(r) for r in RawEventFileLoader(str(path)).Load()]
    logged = [e for e in events if any(v.HasField("histo") for v in e.summary.value)]
    assert [e.step for e in logged] == [0, 1, 2, 3]  # (close() adds its final/ scalars apart)
    for e, c in zip(logged, [cols, cols, fewer, cols], strict=True):
        scalars = [v for v in e.summary.value if v.HasField("simple_value")]
        want = [f"{m}/{la}" if la else m for m, la in zip(c["metric"], c["layer"], strict=True)]
        assert [v.tag for v in scalars] == want
        np.testing.assert_array_equal([v.simple_value for v in scalars],
                                      c["value"].astype(np.float32))
        hists = [v.tag for v in e.summary.value if v.HasField("histo")]
        assert hists and all(t.endswith("/across_layers") for t in hists)

# -- the report ------------------------------------------------------------------------------------
def _png() -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5), dpi=50)
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_write_report_text_and_images(tmp_path):
    md = "| claim | verdict |\n| --- | --- |\n| degradation | supported |"
    png = _png()
    write_report(tmp_path / "report", md, [("fig1 loss curves", "Training loss by depth.", png)])
    write_report(tmp_path / "report", md, [])  # a second report is a later step
    ea = accumulator(tmp_path / "report")
    texts = ea.Tensors("report/verdicts")
    assert [t.step for t in texts] == [0, 1]
    text = texts[0].tensor_proto.string_val[0].decode()
    assert "| degradation | supported |" in text
    assert "report/fig1_loss_curves" in text and "Training loss by depth." in text
    (image,) = ea.Images("report/fig1_loss_curves")
    assert image.encoded_image_string == png and (image.width, image.height) == (100, 75)
    with pytest.raises(DashboardError, match="not a PNG"):
        write_report(tmp_path / "bad", md, [("x", "y", b"GIF89a....")])


# -- serving ---------------------------------------------------------------------------------------
def test_find_logdirs(runs, tmp_path):
    assert find_logdirs(runs) == [runs / "plain20" / "tb", runs / "resnet20" / "tb"]
    with pytest.raises(DashboardError, match="no such directory"):
        find_logdirs(tmp_path / "missing")
    with pytest.raises(DashboardError, match="no runs"):
        find_logdirs(tmp_path)
    started = tmp_path / "started"
    started.mkdir()
    (started / "run.json").write_text("{}")
    assert find_logdirs(tmp_path) == []  # a run that has not logged yet: served, empty for now


def test_serve_errors_on_an_empty_dir(tmp_path):
    with pytest.raises(DashboardError, match="no runs") as e:
        serve(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DashboardError, match="no such directory"):
        serve(tmp_path / "nope")


def _get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}
                                 if data else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_for_runs(base: str, want: set[str], timeout: float = 45.0) -> list[str]:
    stop = threading.Event()
    deadline = 0.0
    while deadline < timeout:
        runs = _get(base + "data/runs")
        if want <= set(runs):
            return runs
        stop.wait(0.25)
        deadline += 0.25
    raise AssertionError(f"TensorBoard did not load {want} within {timeout}s (has {runs})")


def test_real_tensorboard_serves_scalars_layout_and_hparams(runs):
    q = urllib.parse.quote
    with launch(runs, host="127.0.0.1", port=0, reload_interval=0) as server:
        base = server.url
        assert base.startswith("http://127.0.0.1:")
        _wait_for_runs(base, {"plain20/tb", "resnet20/tb"})
        tags = _get(base + "data/plugin/scalars/tags")
        assert "residual_ratio/layer2.1" in tags["resnet20/tb"]
        assert "grad_norm/layer3.2.conv2" in tags["plain20/tb"]
        points = _get(base + f"data/plugin/scalars/scalars?run={q('resnet20/tb')}"
                      f"&tag={q('residual_ratio/layer2.1')}")
        assert [p[1] for p in points] == list(range(0, STEPS + 1, EVERY))
        assert points[-1][2] == pytest.approx(0.2 + 0.01 * STEPS, rel=1e-6)

        layout = _get(base + "data/plugin/custom_scalars/layout")
        categories = {c["title"]: [ch["title"] for ch in c["chart"]] for c in layout["category"]}
        assert categories["grad_norm"] == ["stem", "stage 1", "stage 2", "stage 3", "head"]
        assert categories["residual_ratio"] == ["stage 1", "stage 2", "stage 3"]
        assert "model" in categories

        experiment = _get(base + "data/plugin/hparams/experiment", {"experimentName": ""})
        assert {h["name"] for h in experiment["hparamInfos"]} >= {
            "model", "family", "depth", "shortcut", "seed", "dataset", "lr", "steps"}
        metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
        assert metric_tags == [f"final/{m}" for m in FINAL_METRICS]
        request = {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"],
            "colParams": [{"hparam": "family", "order": "ORDER_ASC", "includeInResult": True},
                          *({"hparam": h["name"], "includeInResult": True}
                            for h in experiment["hparamInfos"] if h["name"] != "family"),
                          *({"metric": {"group": "", "tag": t}, "includeInResult": True}
                            for t in metric_tags)],
        }
        groups = _get(base + "data/plugin/hparams/session_groups", request)
        assert groups["totalSize"] == 2
        by_family = {g["hparams"]["family"]: g for g in groups["sessionGroups"]}
        assert [g["hparams"]["family"] for g in groups["sessionGroups"]] == ["plain", "resnet"]
        for family, group in by_family.items():
            (session,) = group["sessions"]
            assert session["name"] == f"{family}20/tb"
            assert session["status"] == "STATUS_SUCCESS"
            assert group["hparams"]["model"] == f"{family}20"
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            for key, want in FINAL[family].items():
                assert values[f"final/{key}"] == pytest.approx(want, rel=1e-6)
            assert ("final/residual_ratio_mean" in values) == (family == "resnet")
    with pytest.raises(urllib.error.URLError):  # stopped: the port no longer answers
        urllib.request.urlopen(base + "data/runs", timeout=5)


def test_serve_blocks_until_stopped(runs):
    urls: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            serve(runs, port=0, on_ready=urls.append, stop=stop, reload_interval=0)
        except BaseException as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if urls or errors:
                break
            stop.wait(0.1)
        assert not errors and urls and urls[0].startswith("http://127.0.0.1:")
        assert isinstance(_get(urls[0] + "data/runs"), list)
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive() and not errors


def test_profile_metrics_are_the_documented_ones():
    assert PROFILE_METRICS == ("residual_ratio", "identity_gap", "response_std",
                               "response_grad_norm", "grad_norm")


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], ["port 70000 is not a TCP port"]),
    (["--port", "-1"], ["port -1 is not a TCP port"]),
    (["--host", "999.1.1.1", "--port", "0"], ["cannot start TensorBoard on 999.1.1.1"]),
], ids=["port-too-large", "port-negative", "host-unresolvable"])
def test_bad_port_or_host_is_one_line_exit_2(runs, args, words) -> None:
    from helpers import invoke, one_line_error

    one_line_error(invoke("dashboard", runs, *args), *words)


def test_event_files_of_one_second_sort_in_creation_order(tmp_path, monkeypatch) -> None:
    import itertools

    import gradlab.dashboard as dashboard

    monkeypatch.setattr(dashboard, "_EVENT_FILE_IDS", itertools.count(8))
    monkeypatch.setattr(dashboard.time, "time", lambda: 1_700_000_000.0)
    paths = []
    for _ in range(4):  # counters 8, 9, 10, 11 within one second
        w = dashboard._EventWriter(tmp_path, flush_secs=30.0)
        paths.append(w.path.name)
        w.close()
    assert sorted(paths) == paths
