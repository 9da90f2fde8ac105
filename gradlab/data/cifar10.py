"""CIFAR-10 from the official python batches, with a verified download and a safe unpickler.

The files are pickles (``data_batch_1..5``, ``test_batch``, ``batches.meta``), and unpickling
runs whatever the file asks for. A downloaded or copied file is untrusted input, so it is read
by ``_SafeUnpickler``, which resolves only the handful of globals that a CIFAR batch needs
(numpy's array reconstruction and latin-1 bytes); anything else (``os.system`` in a crafted
``__reduce__``, say) is refused before it can run. The download is checked against the md5 the
dataset's authors publish and extracted member by member, refusing any member that would land
outside the target folder or that is a link.

Layout (Krizhevsky 2009): each batch is a dict with ``b"data"``, a uint8 array of shape
(N, 3072) whose rows hold the red, green and blue 32 x 32 planes one after another, each
row-major, so ``reshape(N, 3, 32, 32)`` gives NCHW directly; and ``b"labels"``, a list of N
ints in 0..9. ``batches.meta`` has ``b"label_names"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlab.data.dataset import DataError, Dataset

try:  # numpy >= 2 moved the internals; importing numpy.core there warns.
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "FOLDER",
    "default_data_dir",
    "find_batches",
    "load_cifar10",
]

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
ALL_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
DOWNLOAD_TIMEOUT_S = 60.0

_CHANNELS, _SIZE, _CLASSES = 3, 32, 10
_ROW = _CHANNELS * _SIZE * _SIZE  # 3072 bytes per image
_ENV_VAR = "GRADLAB_DATA"


def default_data_dir() -> Path:
    """Where CIFAR-10 is looked for and downloaded to when no ``data_dir`` is given.

    ``$GRADLAB_DATA`` when set (so a cluster can point every run at a shared copy), else
    ``~/.cache/gradlab/cifar10``.
    """
    env = os.environ.get(_ENV_VAR)
    return Path(env).expanduser() if env else Path("~/.cache/gradlab/cifar10").expanduser()


def find_batches(data_dir: Path) -> Path | None:
    """Return the folder holding all seven batch files, or None when it is not complete.

    Accepts ``data_dir`` pointing at the folder that contains ``cifar-10-batches-py/`` (what
    the tarball extracts to) or at that folder itself, since users pass either.
    """
    for folder in (data_dir / FOLDER, data_dir):
        if all((folder / f).is_file() for f in ALL_FILES):
            return folder
    return None


def load_cifar10(data_dir: str | Path | None = None, *, download: bool = True) -> Dataset:
    """Load the official 50,000/10,000 split, downloading it first if needed and allowed.

    The split is the published one, so unlike digits it does not depend on a seed. Pixels are
    scaled to [0, 1] and normalized with the train split's per-channel mean and std.

    Args:
        data_dir: Folder containing ``cifar-10-batches-py/`` (or that folder itself); defaults
            to ``default_data_dir()``.
        download: Fetch and verify the archive when the files are missing.

    Raises:
        DataError: Files missing while offline, a failed or corrupt download, or a batch file
            that is not a well-formed CIFAR-10 batch (the message names the file).
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    folder = find_batches(data_dir)
    if folder is None:
        if not download:
            raise DataError(
                f"CIFAR-10 not found in {data_dir} and downloading is off: put the python "
                f"batches ({FOLDER}/ from {CIFAR10_URL}) in {data_dir}, or allow downloading"
            )
        _download_and_extract(data_dir)
        folder = find_batches(data_dir)
        if folder is None:
            raise DataError(f"the CIFAR-10 archive did not contain {FOLDER}/ with {ALL_FILES}")

    train = [_read_batch(folder / f) for f in TRAIN_FILES]
    test_data, test_labels = _read_batch(folder / TEST_FILE)
    classes = _read_meta(folder / META_FILE)
    train_u8 = torch.from_numpy(np.concatenate([d for d, _ in train])).view(-1, 3, _SIZE, _SIZE)
    test_u8 = torch.from_numpy(test_data).view(-1, 3, _SIZE, _SIZE)
    mean, std = _uint8_channel_stats(train_u8)
    return Dataset(
        name="cifar10",
        train_x=_normalize_uint8(train_u8, mean, std),
        train_y=torch.from_numpy(np.concatenate([lab for _, lab in train])),
        test_x=_normalize_uint8(test_u8, mean, std),
        test_y=torch.from_numpy(test_labels),
        channels=_CHANNELS,
        num_classes=_CLASSES,
        image_size=_SIZE,
        pad=4,
        flip=True,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        classes=classes,
    )


# --------------------------------------------------------------------------- normalization


def _uint8_channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and population std, in the [0, 1] scale, of uint8 (N, C, H, W).

    A 256-bin histogram per channel gives the statistics exactly in float64 without making a
    float64 copy of the 150M train pixels (1.2 GB); the loop is over 3 channels, not samples.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    counts = torch.stack(
        [torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]
    ).double()
    n = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(dim=1) / n
    std = var.sqrt()
    return mean, torch.where(std < 1e-8, torch.ones_like(std), std)


def _normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std``, as one conversion plus two in-place passes.

    Folding the /255 into the statistics ((x - 255 mean) / (255 std)) avoids a third pass and
    any temporary as large as the output.
    """
    out = x.to(torch.float32)
    out.sub_((mean * 255.0).float().view(1, -1, 1, 1))
    out.div_((std * 255.0).float().view(1, -1, 1, 1))
    return out


# --------------------------------------------------------------------------- safe reading


def _latin1_encode(obj: object, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes.

    Only the latin-1 form that pickle itself emits is allowed: other codecs (zlib, bz2) would
    let a tiny file decompress into gigabytes.
    """
    if not isinstance(obj, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1")


# Everything a CIFAR batch (pickled by Python 2 cPickle, or by Python 3 with protocol 2..5)
# needs; every other global is refused. Object arrays would pass through ``_reconstruct`` but
# their items are unpickled by this same class, and ``_read_batch`` rejects any non-uint8 data.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, bytes and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


def _one_line(text: str, limit: int = 160) -> str:
    """Collapse an exception message to one short line for a DataError."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"{path} is not a valid CIFAR-10 python batch ({_one_line(why)}); "
        "replace it with the original file, or delete the folder to download it again"
    )


def _read_pickle(path: Path) -> dict[str, Any]:
    """Unpickle ``path`` safely and return its dict with keys decoded to str."""
    try:
        with path.open("rb") as f:
            # encoding="bytes" keeps Python 2 str (the original files) as bytes, as they were.
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file {path} is missing") from None
    except OSError as e:
        raise DataError(f"cannot read CIFAR-10 file {path}: {e.strerror or e}") from e
    except Exception as e:  # a corrupt pickle can raise almost any exception type
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise _corrupt(path, f"expected a dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one batch: uint8 (N, 3072) pixels and int64 (N,) labels in 0..9."""
    batch = _read_pickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise _corrupt(path, f"missing key b{key!r}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _corrupt(path, f"b'data' must be a uint8 array of shape (N, {_ROW}), got {got}")
    if data.shape[1] != _ROW or data.shape[0] == 0:
        raise _corrupt(path, f"b'data' must have shape (N, {_ROW}) with N > 0, got {data.shape}")
    try:
        labels = np.asarray(labels)
    except Exception as e:  # ragged or exotic label lists
        raise _corrupt(path, f"b'labels' is not a list of ints ({e})") from e
    if labels.dtype.kind not in "iu" or labels.shape != (data.shape[0],):
        raise _corrupt(
            path, f"b'labels' must be {data.shape[0]} ints, got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= _CLASSES:
        raise _corrupt(
            path, f"labels must lie in 0..{_CLASSES - 1}, got {labels.min()}..{labels.max()}"
        )
    # np.require copies only if the unpickled array is read-only or not C-contiguous; torch
    # would otherwise warn about sharing a read-only buffer.
    return np.require(data, requirements=["C", "W"]), labels.astype(np.int64)


def _read_meta(path: Path) -> tuple[str, ...]:
    """Read the 10 class names from ``batches.meta``."""
    names = _read_pickle(path).get("label_names")
    if not isinstance(names, list | tuple) or len(names) != _CLASSES:
        raise _corrupt(path, f"b'label_names' must be a list of {_CLASSES} names")
    if not all(isinstance(n, bytes | str) for n in names):
        raise _corrupt(path, "b'label_names' must hold bytes or str")
    return tuple(n.decode("latin-1") if isinstance(n, bytes) else n for n in names)


# --------------------------------------------------------------------------- download


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest``. Tests replace this to avoid the network."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract a tar.gz into ``target``, refusing the whole archive if any member is unsafe.

    Unsafe means: a path that resolves outside ``target`` (``../x``, ``/etc/x``), or anything
    but a regular file or folder (symlinks and hard links can point outside; devices make no
    sense here). All members are checked before anything is written, and files are written by
    hand rather than with ``extractall`` so nothing tar-specific (modes, owners) is applied.
    """
    target = target.resolve()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            plan = []
            for m in members:
                dest = (target / m.name).resolve()
                if not dest.is_relative_to(target):
                    raise DataError(
                        f"refusing to extract {archive}: member {m.name!r} would be written "
                        f"outside {target}"
                    )
                if not (m.isfile() or m.isdir()):
                    raise DataError(
                        f"refusing to extract {archive}: member {m.name!r} is a link or "
                        "special file"
                    )
                plan.append((m, dest))
            for m, dest in plan:
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None  # regular files always have a stream
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot extract {archive}: {_one_line(str(e))}") from e


def _download_and_extract(data_dir: Path) -> None:
    """Download, verify and extract the archive so ``data_dir / FOLDER`` appears complete.

    Everything happens in a temporary folder inside ``data_dir`` and the finished folder is
    renamed into place, so an interrupted download never leaves a half-written
    ``cifar-10-batches-py`` that a later run would take for the real thing.
    """
    # Folders this call creates are removed again if the download fails: bad input must not
    # leave anything behind.
    created = []
    for parent in reversed([data_dir, *data_dir.parents]):
        if not parent.exists():
            created.append(parent)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {data_dir}: {e.strerror or e}") from e
    try:
        _fetch_into(data_dir)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never deletes anything else
        raise


def _fetch_into(data_dir: Path) -> None:
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp_name:
        tmp = Path(tmp_name)
        archive = tmp / "cifar-10-python.tar.gz"
        log.info("downloading CIFAR-10 from %s to %s", CIFAR10_URL, data_dir)
        try:
            _fetch(CIFAR10_URL, archive, DOWNLOAD_TIMEOUT_S)
        except (urllib.error.URLError, OSError) as e:  # URLError, timeouts, disk full
            reason = getattr(e, "reason", None) or e
            raise DataError(
                f"could not download CIFAR-10 from {CIFAR10_URL} ({_one_line(str(reason))}); "
                f"put the python batches ({FOLDER}/) in {data_dir} instead"
            ) from e
        got = _md5(archive)
        if got != CIFAR10_MD5:
            raise DataError(
                f"the CIFAR-10 archive from {CIFAR10_URL} has md5 {got}, expected "
                f"{CIFAR10_MD5} (corrupt or tampered download); try again"
            )
        _safe_extract(archive, tmp / "extracted")
        src = tmp / "extracted" / FOLDER
        if not src.is_dir():
            raise DataError(f"the CIFAR-10 archive from {CIFAR10_URL} has no {FOLDER}/ folder")
        dest = data_dir / FOLDER
        if find_batches(data_dir) is not None:
            return  # another process sharing the folder finished first: keep its copy
        if dest.exists() or dest.is_symlink():
            # An incomplete earlier copy: moved aside and kept (it may hold files of the
            # user's), never deleted.
            aside = _free_name(data_dir, f"{FOLDER}.incomplete")
            dest.rename(aside)
            log.warning("CIFAR-10: the incomplete %s was moved to %s", dest, aside)
        os.replace(src, dest)


def _free_name(folder: Path, stem: str) -> Path:
    """``folder/stem``, or ``folder/stem.N`` for the first N not taken."""
    path, n = folder / stem, 1
    while path.exists() or path.is_symlink():
        path, n = folder / f"{stem}.{n}", n + 1
    return path
