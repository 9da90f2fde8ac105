"""Fused probe reductions on CPU: small C kernels, built once per machine, called with ctypes.

Why: a logged step reduces every activation and every activation gradient of the network to a
few numbers. With ATen those are several passes each, and under bf16 autocast every reduction
first makes a float32 copy of its input (ATen's CPU reductions convert bf16 that way). The
kernels in ``kernels.c`` read each tensor once, widen bf16 in registers, and return per-sample
sums in float64; on this project's 2-core CPU, with the tensor in cache, a 128x16x32x32 bf16
gradient takes 0.03 ms instead of 0.47 ms, and a block's four sums 0.15 ms instead of 1.1 ms.

The kernels (``K`` per-sample sums each, returned as a float64 tensor of shape ``(K, N)``):

- ``sq(x)``: ||x||^2.
- ``pair(f, s)``: ||f||^2, ||s||^2, <f, s>, ||max(f, -s)||^2 (= ||relu(f + s) - s||^2).
- ``gap(h, x)``: ||h - x||^2, ||x||^2.
- ``addrelu(f, t)`` for a block whose output is relu(t), t = f + s: ||f||^2, <f, t>
  (<f, s> = <f, t> - ||f||^2), ||relu(t)||^2 (the next block's ||x||^2) and
  ||f - min(t, 0)||^2 = ||relu(t) - s||^2. Both operands are the tensors the block has just
  computed, still in cache; s is not read again.

Four more also write a tensor, through the extension module only (``SumTable.run_out``,
``Kernels.write``): ``addrelu_out(f, s, dst)`` writes dst = relu(f + s) as ATen's add and ReLU
compute it and takes ``addrelu``'s sums of (f, f + s) with the sum in registers;
``relugrad(g, out, dst)`` writes ReLU's gradient ``threshold_backward(g, out, 0)`` and takes its
||dst||^2; ``addrelu_only`` and ``relugrad_only`` write the same without sums. They serve
:func:`add_relu` / :class:`AddReLU`, a residual block's sum and ReLU in one pass each way
(faster than ATen's two on CPU), with or without the probe's measurement.

Plus ``Kernels.sq_list``: ||t||^2 of each of many tensors (a model's parameters, or their
gradients) in one call. The probe's hooks use :meth:`SumTable.sq` and :meth:`SumTable.run2` (what
:meth:`SumTable.run` does for one and two operands, in fewer calls), which write a kernel's sums
into the step's table without creating a tensor.

How they are called: hooks run mid-step, after convolutions have streamed megabytes through the
caches, when each Python-level call costs tens of microseconds instead of one. Where this
interpreter's headers are installed, the library is also built as an extension module whose
``run`` takes the tensors as DLPack capsules and checks their layout in C: a hook's kernel call is
then ``to_dlpack`` and ``run``, two C calls, instead of a dozen tensor attribute reads and a
ctypes call (cold, on this project's 2-core VM: 69 instead of 97 microseconds for a gradient's
``sq``, most of it the pass itself). The same module's ``grad_sq`` is the probe's gradient hook
itself, in C (bound to the step's table and the metric's key by ``functools.partial``): autograd
calls it for each response gradient and no Python code runs at all in the common case (on that
VM, 10-20 microseconds less per call with the caches flushed, about 0.6 ms per logged resnet56
step of 56 gradients); whatever it does not take (a layout DLPack or the kernels refuse, a full
table, another batch size) it hands to the Python hook. Elsewhere, and for any tensor the
extension refuses, the checked ctypes path runs; both call the same kernels, so the sums are the
same to the bit.

When: CPU tensors of float32 or bfloat16 laid out densely per sample (NCHW- or
channels_last-contiguous; through the extension, any order of a sample's elements that leaves no
gap), not while ``torch.compile`` traces the model (Inductor fuses the
eager formulas into the graph then), never on GPUs (ATen's reductions there are cheap and
asynchronous). Everything else takes the eager ATen formulas of :mod:`gradlab.probing.metrics`.

Build: the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) compiles
``kernels.c`` with ``-O3 -march=native -fopenmp`` (falling back to fewer flags; each set first
with ``-DGL_PYTHON`` and Python's include directory, then without) in well under a second; the
library is cached under ``$GRADLAB_CACHE_DIR`` (default ``~/.cache/gradlab``), keyed by the
source, the compiler, its flags, the Python build, the C library and the CPU model and flags,
so a home directory shared by different machines gets one build per CPU kind (where the CPU
cannot be read, on other systems than Linux, no -march=native). If no compiler works, gradlab
warns once and uses the eager formulas.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import itertools
import operator
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.utils.dlpack

__all__ = ["KERNELS", "OUT_KERNELS", "AddReLU", "Kernels", "ReLU", "SumTable", "add_relu",
           "kernels", "relu", "dense_per_sample"]

#: kernel name -> number of per-sample sums it returns
KERNELS = {"sq": 1, "pair": 4, "gap": 2, "addrelu": 4}
#: kernels that also write a tensor (extension only): name -> number of per-sample sums
OUT_KERNELS = {"addrelu_out": 4, "relugrad": 1, "addrelu_only": 0, "relugrad_only": 0}
_KIND = {name: i for i, name in enumerate([*KERNELS, *OUT_KERNELS])}  # the extension's numbers

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}

# Tried in order; the first set the compiler accepts is used (OpenMP and -march=native are
# optional: without them the kernels are single-threaded or use baseline SIMD).
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)


_T = torch.Tensor
_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")
_channels_last = functools.partial(_T.is_contiguous, memory_format=torch.channels_last)
_to_dlpack = torch.utils.dlpack.to_dlpack
_compiling = torch.compiler.is_compiling
_threads = torch.get_num_threads


def dense_per_sample(t: torch.Tensor) -> bool:
    """Whether ``t`` is a non-empty float32/bf16 CPU tensor whose samples are contiguous ranges
    of its memory (NCHW- or channels_last-contiguous), as the kernels require."""
    # The probe calls this in its hooks, mid-step, where every Python-level call is slow (the
    # interpreter's data is out of cache): the common case takes the fewest calls.
    if t.dtype not in _SUFFIX or not t.is_cpu:
        return False
    if not (_channels_last(t) or t.is_contiguous() or _dense_nhwc(t)):
        return False
    # A ZeroTensor has no memory behind it; a negative view's values are not what is stored.
    return (t.numel() != 0 and t.ndim != 0 and t.data_ptr() != 0 and not t.is_neg()
            and not t._is_zerotensor())


def _dense_nhwc(t: torch.Tensor) -> bool:
    """channels_last(_3d)-contiguous (for a tensor that is not NCHW-contiguous)."""
    ndim = t.ndim
    return (ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)
            or ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def _dense_blocks(tensors: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether every tensor is a CPU tensor of ``dtype`` whose elements fill one block of memory
    (contiguous or channels_last(_3d)-contiguous; not a ZeroTensor or a negative view), so its
    ``numel()`` elements from ``data_ptr()`` are all and only its values (in some order).

    For the many tensors of ``sq_list`` (a model's parameters and gradients: hundreds per logged
    step): each property is read for all tensors by ``map`` with C callables, without a Python
    call per tensor; those that are not NCHW-contiguous are checked for channels_last the same
    way, and only if one of them is not, one by one (5-d layouts).
    """
    if set(map(_dtype_of, tensors)) != {dtype} or not all(map(_is_cpu, tensors)):
        return False
    if any(map(_T.is_neg, tensors)) or any(map(_T._is_zerotensor, tensors)):
        return False
    rest = list(itertools.compress(tensors, map(operator.not_, map(_T.is_contiguous, tensors))))
    # (channels_last conv weights and their gradients; then any 5-d one, one by one)
    return all(map(_channels_last, rest)) or all(map(_dense_nhwc, rest))


def _cache_dir() -> Path:
    env = os.environ.get("GRADLAB_CACHE_DIR")
    base = Path(env) if env else (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradlab")
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return base
    except OSError:
        # A shared temporary directory: only a private folder of our own will do, since the
        # library found there is loaded into the process.
        uid = os.getuid() if hasattr(os, "getuid") else None
        fallback = Path(tempfile.gettempdir()) / f"gradlab-{uid if uid is not None else 'user'}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        st = fallback.stat()
        if (uid is not None and st.st_uid != uid) or st.st_mode & 0o022:
            raise RuntimeError(f"{fallback} is not a private directory of this user; set "
                               "GRADLAB_CACHE_DIR") from None
        return fallback


def _cpu_identity() -> str | None:
    """What -march=native depends on: the CPU model and its feature flags (Linux), else None
    (then the kernels are built for the architecture's baseline, not this CPU)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh.read().splitlines()
                     if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        return None
    return "\n".join(dict.fromkeys(lines)) or None


def _compiler() -> str | None:
    env = os.environ.get("CC")
    if env:
        return shutil.which(env) or env
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _python_flags() -> tuple[str, ...]:
    """Flags that also make the library a Python extension module (``-DGL_PYTHON``), where this
    interpreter's headers are installed; none elsewhere (then ctypes alone calls the kernels)."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").is_file():
        return ()
    # macOS links a shared library only when every symbol resolves; an extension module's
    # Python symbols come from the interpreter that loads it (as setuptools links them).
    darwin = ("-undefined", "dynamic_lookup") if sys.platform == "darwin" else ()
    return ("-DGL_PYTHON", f"-I{include}", *darwin)


def _build() -> ctypes.CDLL:
    source = (Path(__file__).with_name("kernels.c")).read_text()
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    cpu = _cpu_identity()
    # -march=native only where the library's cache key can name the CPU it was built for.
    flag_sets = _FLAG_SETS if cpu else [f for f in _FLAG_SETS if "-march=native" not in f]
    # Each set first as an extension module too, then (no headers, a linker that refuses the
    # interpreter's undefined symbols) as a plain library.
    python = _python_flags()
    flag_sets = [f + python for f in flag_sets] + list(flag_sets) if python else flag_sets
    # An extension module is bound to the interpreter's ABI: one library per Python build.
    key = hashlib.sha256("\0".join(
        [source, cc, cpu or "", repr(flag_sets), platform.machine(), sys.platform,
         " ".join(platform.libc_ver()), sys.version,
         str(sysconfig.get_config_var("EXT_SUFFIX"))]).encode()).hexdigest()
    cache = _cache_dir()
    lib_path = cache / f"probe-kernels-{key[:20]}.so"
    if lib_path.exists():
        try:
            return ctypes.CDLL(str(lib_path))
        except OSError:
            pass  # a truncated or foreign file: build it again
    errors = []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(source)
        for flags in flag_sets:
            out = Path(tmp) / f"kernels{len(errors)}.so"
            try:
                proc = subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(out)],
                                      capture_output=True, text=True, timeout=180)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                break
            if proc.returncode == 0:
                os.replace(out, lib_path)  # atomic: concurrent builders each leave a whole file
                try:
                    return ctypes.CDLL(str(lib_path))
                except OSError as e:  # built but not loadable here: the next flag set
                    errors.append(f"OSError: {e}")
                    lib_path.unlink(missing_ok=True)
                    continue
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            errors.append(next((ln for ln in lines if "error" in ln), lines[-1] if lines
                               else f"exit {proc.returncode}"))
    raise RuntimeError(f"{Path(cc).name} could not build the kernels: {errors[0][:200]}")


def _extension(lib: ctypes.CDLL):
    """The ``run`` function of the library's extension module (built with ``-DGL_PYTHON``), or
    None (a plain library, or one the interpreter cannot import)."""
    if not hasattr(lib, "PyInit__gradlab_kernels"):
        return None
    try:
        spec = importlib.util.spec_from_file_location("_gradlab_kernels", lib._name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.configure(_to_dlpack, _threads)
        return module
    except Exception:  # noqa: BLE001 - any failure (a warning made an error too): ctypes only
        return None


class Kernels:
    """The C kernels, built on first use; after a failed build, :meth:`usable` is False.

    ``fast``: the extension module's ``run(kind, a, b, table, rows, capacity, col, threads)``
    (DLPack capsules in, the column written or -1 out; see ``kernels.c``), where the library
    could be built as one; else None, and only the ctypes functions are used.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] | None = None
        self.fast = None
        self.run_out = None
        self.grad_sq = None
        self.failed: str | None = None

    def load(self, *, required: bool = False) -> bool:
        """Build or load the library once. On failure: warn once and return False, or raise
        ``RuntimeError`` with the reason when ``required``."""
        if self._fns is None and self.failed is None:
            with self._lock:
                if self._fns is None and self.failed is None:
                    try:
                        lib = _build()
                        fns = {}
                        for name in KERNELS:
                            for dtype, suffix in _SUFFIX.items():
                                fn = getattr(lib, f"gl_{name}_{suffix}")
                                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                               ctypes.c_int]
                                fn.restype = None
                                fns[(name, dtype)] = fn
                        for dtype, suffix in _SUFFIX.items():
                            fn = getattr(lib, f"gl_sqlist_{suffix}")
                            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                           ctypes.c_void_p, ctypes.c_int]
                            fn.restype = None
                            fns[("sqlist", dtype)] = fn
                        ext = _extension(lib)
                        self.fast = None if ext is None else ext.run
                        self.run_out = None if ext is None else ext.run_out
                        self.grad_sq = None if ext is None else ext.grad_sq
                        self._fns = fns
                    except Exception as e:  # noqa: BLE001 - any build failure means: eager
                        self.failed = f"{type(e).__name__}: {str(e).strip()[:300]}"
                        if not required:
                            # (said for both users: the probe's reductions and the
                            # training loop's non-finite check, which runs without a probe)
                            warnings.warn(f"gradlab: C kernels unavailable ({self.failed}); "
                                          "probe reductions and the non-finite gradient check "
                                          "use ATen instead (same values, slower on CPU)",
                                          RuntimeWarning, stacklevel=3)
        if self.failed is not None and required:
            raise RuntimeError(f"gradlab: C kernels unavailable ({self.failed})")
        return self._fns is not None

    def fn(self, name: str, dtype: torch.dtype):
        """The C function of kernel ``name`` for ``dtype`` (None if the build failed)."""
        return self._fns[(name, dtype)] if self.load() else None

    def sq_list(self, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        """``||t||^2`` of each tensor (float64, shape (len,)) in one call, or None when the
        kernels cannot take them all (one dtype, float32/bf16, CPU, each one dense block of
        memory: contiguous, or channels_last(_3d)-contiguous; not traced)."""
        if not tensors or torch.compiler.is_compiling():
            return None
        dtype = tensors[0].dtype
        if dtype not in _SUFFIX or not _dense_blocks(tensors, dtype):
            return None
        fn = self.fn("sqlist", dtype)
        if fn is None:
            return None
        count = len(tensors)
        ptrs = (ctypes.c_void_p * count)(*map(_T.data_ptr, tensors))
        sizes = (ctypes.c_int64 * count)(*map(_T.numel, tensors))
        out = torch.empty(count, dtype=torch.float64)
        fn(ptrs, sizes, count, out.data_ptr(), torch.get_num_threads())
        return out

    def writes(self) -> bool:
        """Whether the kernels that write tensors are there (built, with the extension module
        that alone reaches them); loads the library on first use."""
        return self.run_out is not None or (self.load() and self.run_out is not None)

    def write(self, name: str, a: torch.Tensor, b: torch.Tensor, dst: torch.Tensor) -> bool:
        """Kernel ``addrelu_only`` (dst = relu(a + b)) or ``relugrad_only`` (dst =
        threshold_backward(a, b, 0)): ATen's values, one pass, no sums. False with nothing
        written where it does not apply (no extension module, a layout it does not read: dst
        must have a's dtype, shape and strides)."""
        run = self.run_out
        if run is None or _compiling() or a.is_neg() or b.is_neg():
            return False
        try:
            return run(_KIND[name], _to_dlpack(a), _to_dlpack(b), _to_dlpack(dst), 0, 0, 0, 0,
                       _threads()) >= 0
        except Exception:  # noqa: BLE001 - a layout DLPack cannot export
            return False

    def usable(self, *tensors: torch.Tensor) -> bool:
        """Whether the kernels can reduce these tensors (same shape, strides and dtype; dense
        per sample; CPU; not inside a ``torch.compile`` trace) and are built."""
        if not tensors or torch.compiler.is_compiling() or not _layout_ok(tensors):
            return False
        return self.load()

    def __call__(self, name: str, *tensors: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Run kernel ``name`` on one tensor (``sq``) or two; a float64 ``(K, N)`` tensor of
        per-sample sums, N = the size of the first dim (1 for a 1-d tensor).

        ``out``: write into this float64 CPU ``(N, K)`` tensor with unit column stride (a column
        slice of a larger table) instead of a new one; its transpose is returned.
        """
        if not _takes(name, tensors):
            raise ValueError(f"kernel {name!r} with {len(tensors)} tensors")
        # The kernels read raw memory: the layout is checked on every call, never assumed.
        if not _layout_ok(tensors):
            raise ValueError(f"kernel {name!r}: tensors must be CPU float32/bfloat16, dense per "
                             "sample, with equal shapes and strides")
        self.load(required=True)
        n, k = _samples(tensors[0]), KERNELS[name]
        if out is None:
            out = torch.empty((n, k), dtype=torch.float64)
        elif (out.dtype != torch.float64 or out.device.type != "cpu" or out.shape != (n, k)
              or out.stride(1) != 1 or out.stride(0) < k):
            raise ValueError(f"kernel {name!r}: out must be a float64 CPU ({n}, {k}) tensor "
                             "with unit column stride")
        _launch(self._fns[(name, tensors[0].dtype)], tensors[0],
                tensors[1] if len(tensors) == 2 else None, n, out.data_ptr(), out.stride(0))
        return out.T


class SumTable:
    """One logged step's per-sample sums: a float64 ``(N, columns)`` table that the kernels
    write into, column by column, so a hook allocates nothing and does no arithmetic; the
    snapshot derives every metric from it in a few vectorized ops. Grows on the first step,
    then is reused."""

    def __init__(self) -> None:
        self._set(torch.empty((0, 0), dtype=torch.float64))
        self.used = 0

    def _set(self, table: torch.Tensor) -> None:
        # Plain ints for the hot path: the shape and address of the (contiguous) table.
        self.table = table
        self._rows, self._cap = table.shape
        self._ptr = table.data_ptr()

    @property
    def n(self) -> int:
        return self._rows

    def take(self, n: int, k: int) -> int | None:
        """Reserve the next ``k`` columns for ``n`` samples; their first index, or None when this
        step's table holds another batch size (the caller then computes its metric eagerly)."""
        if n != self._rows:
            if self.used:
                return None
            self._set(torch.empty((n, max(self._cap, 64)), dtype=torch.float64))
        if self.used + k > self._cap:
            grown = torch.empty((n, max(2 * self._cap, self.used + k)), dtype=torch.float64)
            grown[:, : self.used] = self.table[:, : self.used]
            self._set(grown)
        col = self.used
        self.used += k
        return col

    def columns(self, col: int, k: int) -> torch.Tensor:
        """The ``(n, k)`` view of columns reserved by :meth:`take`."""
        return self.table[:, col: col + k]

    def run(self, name: str, *tensors: torch.Tensor) -> int | None:
        """Kernel ``name`` into the next columns: their first index, or None when the kernels
        cannot take these tensors (layout, dtype, device, tracing, no build, another batch
        size), in which case nothing is written and the caller computes eagerly.

        No tensor is created: one layout check and one C call, by :meth:`sq` or :meth:`run2`
        (which the probe's hooks call directly).
        """
        if not _takes(name, tensors):
            return None
        return self.sq(tensors[0]) if name == "sq" else self.run2(name, *tensors)

    def sq(self, t: torch.Tensor) -> int | None:
        """Kernel ``sq`` on t into the next column (see :meth:`run`): the probe's most frequent
        call (every response gradient)."""
        fast = kernels.fast
        if fast is not None and t.is_cpu and not _compiling():
            # The common case in two C calls: the extension checks the layout itself, and takes
            # any tensor whose samples are dense ranges, in whatever order of their elements
            # (NCHW, channels_last, other permutations: per-sample sums do not depend on it);
            # the checked path below takes NCHW and channels_last only. (A neg view's sign,
            # which DLPack does not carry, cannot change a sum of squares.)
            col = self.used
            try:
                if fast(0, _to_dlpack(t), None, self._ptr, self._rows, self._cap, col,
                        _threads()) >= 0:
                    self.used = col + 1
                    return col
            except Exception:  # noqa: BLE001, S110 - a layout DLPack cannot export: checked below
                pass
        if torch.compiler.is_compiling() or not dense_per_sample(t):
            return None
        return self._launch("sq", t, None)

    def run2(self, name: str, a: torch.Tensor, b: torch.Tensor) -> int | None:
        """Two-operand kernel ``name`` on a and b into the next columns (see :meth:`run`)."""
        fast = kernels.fast
        if (fast is not None and a.is_cpu and not _compiling()
                and not (a.is_neg() or b.is_neg())):  # (DLPack would drop the sign bit)
            col = self.used
            try:
                if fast(_KIND[name], _to_dlpack(a), _to_dlpack(b), self._ptr, self._rows,
                        self._cap, col, _threads()) >= 0:
                    self.used = col + KERNELS[name]
                    return col
            except Exception:  # noqa: BLE001, S110 - a layout DLPack cannot export: checked below
                pass
        if torch.compiler.is_compiling() or not _layout_ok((a, b)):
            return None
        return self._launch(name, a, b)

    def run_out(self, name: str, a: torch.Tensor, b: torch.Tensor,
                dst: torch.Tensor) -> int | None:
        """Kernel ``name`` of :data:`OUT_KERNELS`, which writes ``dst`` as well as its sums:
        ``addrelu_out`` writes relu(a + b) (a + b rounded to the dtype first, as ATen's add) and
        takes ``addrelu``'s sums of (a, a + b); ``relugrad`` writes ReLU's gradient
        ``threshold_backward(a, b, 0)`` (a the gradient of the ReLU's output b) and takes its
        ||dst||^2. dst must have a's dtype, shape and strides. The first column, or None with
        nothing written (no extension module, a layout the kernels do not read, another batch
        size, a full table: the caller computes with ATen)."""
        run = kernels.run_out
        if run is None or not a.is_cpu or _compiling() or a.is_neg() or b.is_neg():
            return None
        n, k = (a.shape[0] if a.ndim > 1 else 1), OUT_KERNELS[name]
        col = self.used
        if n != self._rows or col + k > self._cap:
            col = self.take(n, k)
            if col is None:
                return None
            self.used = col  # (reserved only if the kernel runs)
        try:
            if run(_KIND[name], _to_dlpack(a), _to_dlpack(b), _to_dlpack(dst), self._ptr,
                   self._rows, self._cap, col, _threads()) >= 0:
                self.used = col + k
                return col
        except Exception:  # noqa: BLE001, S110 - a layout DLPack cannot export
            pass
        return None

    def _launch(self, name: str, a: torch.Tensor, b: torch.Tensor | None) -> int | None:
        # Called from hooks mid-step, where each Python-level call costs: the common case
        # (kernels loaded, the table holds this batch size and has room) takes no helper.
        fns = kernels._fns
        if fns is None:
            if not kernels.load():
                return None
            fns = kernels._fns
        n = a.shape[0] if a.ndim > 1 else 1  # = _samples(a)
        k = KERNELS[name]
        col = self.used
        if n == self._rows and col + k <= self._cap:
            self.used = col + k
        else:
            col = self.take(n, k)
            if col is None:
                return None
        # The table is contiguous (n, capacity): column col starts 8 * col bytes in.
        fns[(name, a.dtype)](a.data_ptr(), None if b is None else b.data_ptr(), n,
                             a.numel() // n, self._ptr + 8 * col, self._cap,
                             torch.get_num_threads())
        return col

    def keep(self, columns: list[int]) -> dict[int, int]:
        """Move these columns (ascending) to the front and free the rest: old -> new index."""
        if columns:
            self.table[:, : len(columns)] = self.table[:, columns]
        self.used = len(columns)
        return {c: i for i, c in enumerate(columns)}

    def filled(self) -> torch.Tensor:
        """This step's columns; the next :meth:`take` starts a new step."""
        out = self.table[:, : self.used]
        self.used = 0
        return out


def _takes(name: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``name`` is a kernel and ``tensors`` its number of operands."""
    return name in KERNELS and len(tensors) == (1 if name == "sq" else 2)


def _samples(t: torch.Tensor) -> int:
    """The kernels' N: the first dim's size (1 for a 1-d tensor)."""
    return t.shape[0] if t.ndim > 1 else 1


def _launch(fn, a: torch.Tensor, b: torch.Tensor | None, n: int, out_ptr: int, ld: int) -> None:
    """Call a per-sample kernel on checked tensors (n samples), writing row i at
    ``out_ptr + 8*i*ld``."""
    fn(a.data_ptr(), None if b is None else b.data_ptr(), n, a.numel() // n, out_ptr, ld,
       torch.get_num_threads())


def _layout_ok(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether the kernels can read these tensors (at most two): the first dense per sample, the
    second (if any) a CPU tensor of the first's dtype, shape and strides (so of its layout), with
    memory behind it and its stored values its values."""
    first = tensors[0]
    if not dense_per_sample(first):
        return False
    if len(tensors) == 1:
        return True
    second = tensors[1]
    return (len(tensors) == 2 and second.dtype is first.dtype and second.is_cpu
            and second.shape == first.shape and second.stride() == first.stride()
            and second.data_ptr() != 0 and not second.is_neg() and not second._is_zerotensor())


#: Process-wide kernels (they hold no model state).
kernels = Kernels()

_threshold_backward = torch.ops.aten.threshold_backward


def _relu_grad(ctx, g: torch.Tensor) -> torch.Tensor:
    """ReLU's gradient for AddReLU and ReLU (ctx holds the output and the record)."""
    (out,) = ctx.saved_tensors
    record = ctx.record
    live = record is not None and record.live
    gi = None
    if not torch.is_grad_enabled():  # (create_graph: ATen's op, differentiable)
        gi = torch.empty_like(g)
        if not (record.measure(g, out, gi) if live
                else kernels.write("relugrad_only", g, out, gi)):
            gi = None
    if gi is None:
        gi = _threshold_backward(g, out, 0)
        if live:
            record.fallback(gi)
    return gi


class AddReLU(torch.autograd.Function):
    """``relu(f + s)``, precomputed by one kernel pass, with ReLU's gradient by another.

    ``pack = (out, record)``: ``out`` holds relu(f + s) as ATen computes it (written by
    ``addrelu_only``, or by ``addrelu_out`` with a probe's sums). The backward computes ReLU's
    gradient, ATen's ``threshold_backward(g, out, 0)`` to the bit, and passes it to both
    operands as the add's backward does: by ``relugrad_only``, or where ``record`` (a probe's)
    is live by ``record.measure(g, out, gi)``, the kernel that also takes ||g||^2. Where no
    kernel applies (a gradient of another layout; double backward, which needs a
    differentiable op) ATen computes it and ``record.fallback(gi)`` measures it.
    """

    @staticmethod
    def forward(ctx, f, s, pack):
        out, ctx.record = pack
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        gi = _relu_grad(ctx, g)
        need = ctx.needs_input_grad
        return (gi if need[0] else None), (gi if need[1] else None), None


class ReLU(torch.autograd.Function):
    """``torch.relu(x)`` (ATen's forward) whose backward computes ReLU's gradient in one kernel
    pass, ``relugrad_only``, or where ``record`` (a probe's; None otherwise) is live measures
    the gradient reaching x as it computes it (see :class:`AddReLU`)."""

    @staticmethod
    def forward(ctx, x, record):
        out = torch.relu(x)
        ctx.record = record
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        return _relu_grad(ctx, g), None


def relu(x: torch.Tensor) -> torch.Tensor | None:
    """``torch.relu(x)`` whose gradient is computed by ``relugrad_only`` (:class:`ReLU`, one
    pass, ATen's values), or None where that does not apply (no gradient wanted, not CPU,
    traced by ``torch.compile``, no extension)."""
    if not (x.is_cpu and x.requires_grad and torch.is_grad_enabled()) or _compiling():
        return None
    return ReLU.apply(x, None) if kernels.writes() else None


def add_relu(f: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
    """``relu(f + s)`` in one kernel pass (ATen's add and ReLU are two, and the sum is stored),
    differentiable (:class:`AddReLU`); None where the kernels do not apply: not CPU, operands
    of different dtypes or layouts, not dense, traced by ``torch.compile``, no extension."""
    if not f.is_cpu or _compiling() or not kernels.writes():
        return None
    out = torch.empty_like(f)
    if not kernels.write("addrelu_only", f, s, out):
        return None
    if not (torch.is_grad_enabled() and (f.requires_grad or s.requires_grad)):
        return out
    return AddReLU.apply(f, s, (out, None))
