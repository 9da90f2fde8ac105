"""CIFAR-10 reader, download and safety, on tiny files written in the exact original format."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlab.data import DataError, load_dataset
from gradlab.data import cifar10 as cifar

PER_BATCH = 20
NAMES = b"airplane automobile bird cat deer dog frog horse ship truck".split()
# The planted image: batch 1, image 3. Raw index of (channel, row, col) is c*1024 + r*32 + col.
PLANTED = {(0, 2, 5): 255, (1, 7, 1): 200, (2, 31, 30): 17}


class _Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING) and numpy's old module path, like cPickle.

    The real CIFAR files were written by Python 2; this makes the test files byte-for-byte the
    same kind of pickle, so the reader is tested on what it will really meet.
    """

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", n) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin-1"))

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _dump(obj: object, path: Path, py2: bool = False) -> None:
    if py2:
        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue())
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))


def _batch(seed: int, n: int = PER_BATCH) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar(root: Path, py2: bool = False) -> dict[str, dict[bytes, object]]:
    """Write a complete tiny CIFAR-10 (5 x 20 train, 20 test) to ``root/cifar-10-batches-py``."""
    folder = root / cifar.FOLDER
    folder.mkdir(parents=True)
    batches = {f: _batch(i) for i, f in enumerate(cifar.TRAIN_FILES + (cifar.TEST_FILE,))}
    planted = np.zeros(3072, dtype=np.uint8)
    for (c, r, col), v in PLANTED.items():
        planted[c * 1024 + r * 32 + col] = v
    batches["data_batch_1"][b"data"][3] = planted
    batches["data_batch_1"][b"labels"][3] = 7
    for name, content in batches.items():
        _dump(content, folder / name, py2)
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": NAMES, b"num_vis": 3072}
    _dump(meta, folder / cifar.META_FILE, py2)
    return batches


def _tarball(src_root: Path, out: Path, extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src_root / cifar.FOLDER, arcname=cifar.FOLDER)
        for info in extra or []:
            data = b"owned" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar(root)


def _raw_pixels(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Undo the normalization back to the 0..255 pixel scale."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (x.double() * s + m) * 255


@pytest.mark.parametrize("py2", [False, True], ids=["py3-protocol2", "py2-cpickle-style"])
def test_reads_pixels_in_nchw_order_and_labels(tmp_path: Path, py2: bool) -> None:
    written = write_cifar(tmp_path, py2=py2)
    data = load_dataset("cifar10", tmp_path, download=False)
    assert data.train_x.shape == (5 * PER_BATCH, 3, 32, 32)
    assert data.test_x.shape == (PER_BATCH, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert (data.channels, data.num_classes, data.image_size) == (3, 10, 32)
    assert (data.pad, data.flip) == (4, True)
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"

    planted = _raw_pixels(data.train_x[3:4], data.mean, data.std)[0].round()
    expected = torch.zeros(3, 32, 32, dtype=torch.float64)
    for (c, r, col), v in PLANTED.items():
        expected[c, r, col] = v
    torch.testing.assert_close(planted, expected)
    assert data.train_y[3] == 7

    raw_train = np.concatenate([written[f][b"data"] for f in cifar.TRAIN_FILES])
    labels = np.concatenate([written[f][b"labels"] for f in cifar.TRAIN_FILES])
    assert torch.equal(data.train_y, torch.from_numpy(labels))
    assert torch.equal(data.test_y, torch.tensor(written["test_batch"][b"labels"]))
    as_nchw = torch.from_numpy(raw_train.reshape(-1, 3, 32, 32)).double()
    # float32 rounding of the normalized values is ~1e-5 in the 0..255 scale.
    restored = _raw_pixels(data.train_x, data.mean, data.std)
    torch.testing.assert_close(restored, as_nchw, atol=1e-3, rtol=0)


def test_normalized_with_train_statistics(tiny: tuple[Path, dict]) -> None:
    root, written = tiny
    data = load_dataset("cifar10", root, download=False)
    std, mean = torch.std_mean(data.train_x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)

    raw = np.concatenate([written[f][b"data"] for f in cifar.TRAIN_FILES]).reshape(-1, 3, 32, 32)
    raw = torch.from_numpy(raw).double() / 255
    want_std, want_mean = torch.std_mean(raw, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(torch.tensor(data.mean, dtype=torch.float64), want_mean)
    torch.testing.assert_close(torch.tensor(data.std, dtype=torch.float64), want_std)
    # The test split uses the train statistics, not its own.
    test_raw = torch.from_numpy(written["test_batch"][b"data"].reshape(-1, 3, 32, 32)).double()
    expected = (test_raw / 255 - want_mean.view(1, 3, 1, 1)) / want_std.view(1, 3, 1, 1)
    torch.testing.assert_close(data.test_x.double(), expected, atol=1e-5, rtol=1e-5)


def test_data_dir_may_be_the_batches_folder_itself(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    data = load_dataset("cifar10", root / cifar.FOLDER, download=False)
    assert data.train_size == 5 * PER_BATCH


def test_env_var_sets_default_dir(tiny: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny
    monkeypatch.setenv("GRADLAB_DATA", str(root))
    assert cifar.default_data_dir() == root
    assert load_dataset("cifar10", download=False).test_size == PER_BATCH


def test_default_dir_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADLAB_DATA", raising=False)
    assert cifar.default_data_dir() == Path.home() / ".cache" / "gradlab" / "cifar10"


def test_missing_offline_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere") in message and cifar.FOLDER in message


def test_incomplete_folder_counts_as_missing(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / cifar.FOLDER / "data_batch_4").unlink()
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", tmp_path, download=False)


# ----------------------------------------------------------------------------- download


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_cifar(src)
    return _tarball(src, tmp_path / "cifar-10-python.tar.gz")


def _serve(monkeypatch: pytest.MonkeyPatch, tarball: Path, md5: str | None = None) -> list[str]:
    """Replace the network fetch by a local copy; returns the list of URLs requested."""
    calls: list[str] = []

    def fake_fetch(url: str, dest: Path, timeout: float) -> None:
        calls.append(url)
        assert timeout > 0
        shutil.copyfile(tarball, dest)

    monkeypatch.setattr(cifar, "_fetch", fake_fetch)
    if md5 is not None:
        monkeypatch.setattr(cifar, "CIFAR10_MD5", md5)
    return calls


def test_download_verifies_and_extracts(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _serve(monkeypatch, archive, _md5(archive))
    target = tmp_path / "data"
    data = load_dataset("cifar10", target)
    assert calls == [cifar.CIFAR10_URL]
    assert data.train_size == 5 * PER_BATCH
    assert sorted(p.name for p in target.iterdir()) == [cifar.FOLDER]  # no temp leftovers
    # Second load finds the files and does not fetch again.
    load_dataset("cifar10", target, download=False)
    load_dataset("cifar10", target)
    assert len(calls) == 1


def test_download_replaces_incomplete_copy(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, archive, _md5(archive))
    target = tmp_path / "data"
    (target / cifar.FOLDER).mkdir(parents=True)
    (target / cifar.FOLDER / "data_batch_1").write_bytes(b"partial")
    (target / cifar.FOLDER / "notes.txt").write_text("mine\n")
    assert load_dataset("cifar10", target).train_size == 5 * PER_BATCH
    # The incomplete copy is kept beside the new one, with whatever else it held.
    aside = target / f"{cifar.FOLDER}.incomplete"
    assert (aside / "notes.txt").read_text() == "mine\n"
    assert (aside / "data_batch_1").read_bytes() == b"partial"
    # A second incomplete copy does not take the first one's place.
    shutil.rmtree(target / cifar.FOLDER)
    (target / cifar.FOLDER).mkdir()
    assert load_dataset("cifar10", target).train_size == 5 * PER_BATCH
    assert (aside / "notes.txt").exists() and (target / f"{cifar.FOLDER}.incomplete.1").is_dir()


def test_md5_mismatch_is_rejected(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, archive, md5="0" * 32)
    target = tmp_path / "data"
    with pytest.raises(DataError, match="md5") as info:
        load_dataset("cifar10", target)
    assert "\n" not in str(info.value)
    assert not target.exists()  # nothing extracted; the folder the download made is gone


def test_real_md5_constant_rejects_other_archives(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, archive)
    assert cifar.CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"
    with pytest.raises(DataError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", tmp_path / "data")


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escaped.txt"),
        _member(f"{cifar.FOLDER}/../../escaped.txt"),
        _member("/tmp/gradlab-absolute-escape.txt"),
        _member(f"{cifar.FOLDER}/link", tarfile.SYMTYPE, "/etc/passwd"),
        _member(f"{cifar.FOLDER}/hard", tarfile.LNKTYPE, "/etc/passwd"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink"],
)
def test_unsafe_tarball_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: tarfile.TarInfo
) -> None:
    src = tmp_path / "src"
    write_cifar(src)
    bad = _tarball(src, tmp_path / "bad.tar.gz", extra=[member])
    _serve(monkeypatch, bad, _md5(bad))
    target = tmp_path / "deep" / "data"
    with pytest.raises(DataError, match="refusing to extract"):
        load_dataset("cifar10", target)
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/gradlab-absolute-escape.txt").exists()
    assert not (tmp_path / "deep").exists()  # nothing extracted; created folders removed


def test_not_a_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"<html>proxy error</html>")
    _serve(monkeypatch, junk, _md5(junk))
    with pytest.raises(DataError, match="cannot extract"):
        load_dataset("cifar10", tmp_path / "data")


def test_network_failure_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dest: Path, timeout: float) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "_fetch", offline)
    with pytest.raises(DataError, match="could not download") as info:
        load_dataset("cifar10", tmp_path / "data")
    assert "\n" not in str(info.value) and "name resolution" in str(info.value)


# ----------------------------------------------------------------------------- corrupt files


class _Shell:
    """Unpickling this runs a shell command: what a malicious batch file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Rot13:
    """A reference to ``_codecs.encode`` with a codec other than latin-1."""

    def __reduce__(self) -> tuple:
        return (codecs.encode, ("payload", "rot13"))


def _corruptions(marker: Path) -> dict[str, bytes]:
    good = _batch(99)
    full = pickle.dumps(good, protocol=2)
    wrong_shape = {**good, b"data": np.zeros((PER_BATCH, 1024), np.uint8)}
    wrong_dtype = {**good, b"data": good[b"data"].astype(np.float32)}
    bad_label = {**good, b"labels": [10] + good[b"labels"][1:]}
    negative_label = {**good, b"labels": [-1] + good[b"labels"][1:]}
    short_labels = {**good, b"labels": good[b"labels"][:-1]}
    text_labels = {**good, b"labels": ["cat"] * PER_BATCH}
    no_labels = {k: v for k, v in good.items() if k != b"labels"}
    return {
        "truncated": full[: len(full) // 2],
        "empty": b"",
        "not-a-pickle": b"hello world, not a pickle",
        "not-a-dict": pickle.dumps([1, 2, 3], protocol=2),
        "wrong-shape": pickle.dumps(wrong_shape, protocol=2),
        "wrong-dtype": pickle.dumps(wrong_dtype, protocol=2),
        "label-10": pickle.dumps(bad_label, protocol=2),
        "label-negative": pickle.dumps(negative_label, protocol=2),
        "labels-short": pickle.dumps(short_labels, protocol=2),
        "labels-text": pickle.dumps(text_labels, protocol=2),
        "missing-labels": pickle.dumps(no_labels, protocol=2),
        "os-system": pickle.dumps({b"data": _Shell(marker), b"labels": []}, protocol=2),
        "exec": pickle.dumps({b"data": _Exec(marker), b"labels": []}, protocol=4),
        "codec": pickle.dumps({b"data": _Rot13(), b"labels": []}, protocol=2),
    }


CORRUPTIONS = list(_corruptions(Path("x")))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_batch_names_the_file(tmp_path: Path, kind: str) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    bad = tmp_path / cifar.FOLDER / "data_batch_2"
    bad.write_bytes(_corruptions(marker)[kind])
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message
    assert not marker.exists(), "the malicious pickle ran code"


def test_malicious_pickle_is_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(_corruptions(marker)["os-system"])
    with pytest.raises(DataError, match="refused to load global"):
        cifar._read_batch(bad)
    assert not marker.exists()


def test_corrupt_meta_names_the_file(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    meta = tmp_path / cifar.FOLDER / cifar.META_FILE
    meta.write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    with pytest.raises(DataError, match="batches.meta"):
        load_dataset("cifar10", tmp_path, download=False)


def test_a_copy_finished_meanwhile_by_another_process_is_kept(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two jobs sharing a data folder download at once: the one that finishes second must not
    # move the first one's complete copy away (the first may be reading it).
    target = tmp_path / "data"
    _serve(monkeypatch, archive, _md5(archive))
    fetch = cifar._fetch

    def slow_fetch(url: str, dest: Path, timeout: float) -> None:
        write_cifar(target)  # the other job's complete copy lands meanwhile
        (target / cifar.FOLDER / "theirs").write_text("")
        fetch(url, dest, timeout)

    monkeypatch.setattr(cifar, "_fetch", slow_fetch)
    assert load_dataset("cifar10", target).train_size == 5 * PER_BATCH
    assert (target / cifar.FOLDER / "theirs").exists()
    assert sorted(p.name for p in target.iterdir()) == [cifar.FOLDER]
