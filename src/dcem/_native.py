"""Optional C loops for DCEM's passes over the (B, N, d) noise on the CPU.

``_native.c`` is compiled on first use with the system's C compiler (``$CC``, else
``cc``) into ``$DCEM_CACHE_DIR`` (default ``~/.cache/dcem``), under a name keyed by the
source, the compiler and the CPU's flags (``-march=native`` code must not run on another
CPU), written to a temporary file and renamed, so concurrent processes never load a
half-written library. Where there is no compiler, the build fails, or ``DCEM_NATIVE=0``,
:func:`library` returns ``None`` and :mod:`dcem.optim` runs the same sums in PyTorch blocks.

Each function takes C-contiguous float32 or float64 NumPy arrays of one dtype and returns
new arrays (shapes in ``_native.c``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ["-O3", "-fopenmp-simd", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler_version(cc: str) -> str:
    done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout


def _build(cc: str) -> Path:
    """Compile (once per source, compiler and CPU) and return the library's path."""
    tag = "\0".join([_SOURCE.read_text(), cc, _compiler_version(cc), _cpu_flags()])
    path = Path(os.environ.get("DCEM_CACHE_DIR") or Path.home() / ".cache" / "dcem")
    path = path / f"native-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "native.so"
        for arch in (["-march=native"], []):  # some compilers lack -march=native
            done = subprocess.run(
                [cc, *_FLAGS, *arch, str(_SOURCE), "-o", str(out)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode == 0:
                os.replace(out, path)
                return path
    raise OSError(f"{cc} could not build {_SOURCE.name}: {done.stderr.strip()[-500:]}")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
    pointer, count = ctypes.c_void_p, ctypes.c_long
    for suffix in ("f32", "f64"):
        for name, pointers in (("noise_moments", 4), ("noise_moments_vjp", 4), ("sample_vjp", 4)):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [pointer] * pointers + [count] * 3
            fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled loops, or ``None`` where they are switched off or cannot be built."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib = None
                if os.environ.get("DCEM_NATIVE", "1") != "0":
                    try:
                        lib = _load()
                    except (OSError, RuntimeError, subprocess.SubprocessError):
                        lib = None
                _state["lib"] = lib
    return _state["lib"]


def _call(name: str, arrays: list[np.ndarray], outs: list[np.ndarray], shape: tuple) -> None:
    lib = library()
    assert lib is not None
    suffix = "f32" if arrays[0].dtype == np.float32 else "f64"
    fn = getattr(lib, f"{name}_{suffix}")
    fn(*(a.ctypes.data for a in arrays + outs), *shape)


def _two_sums(name: str, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two (B, d) sums over n that the C loop ``name`` forms from x and eps (B, N, d)."""
    x, eps = np.ascontiguousarray(x), np.ascontiguousarray(eps)
    first = np.empty((eps.shape[0], eps.shape[2]), eps.dtype)
    second = np.empty_like(first)
    _call(name, [x, eps], [first, second], eps.shape)
    return first, second


def noise_moments(w: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_n w eps, sum_n w eps^2)`` (B, d) for w (B, N) and eps (B, N, d)."""
    return _two_sums("noise_moments", w, eps)


def noise_moments_vjp(eps: np.ndarray, g_a: np.ndarray, g_q: np.ndarray) -> np.ndarray:
    """``sum_d (eps g_a + eps^2 g_q)`` (B, N) for eps (B, N, d), g_a and g_q (B, d)."""
    arrays = [np.ascontiguousarray(t) for t in (eps, g_a, g_q)]
    g_w = np.empty(eps.shape[:2], eps.dtype)
    _call("noise_moments_vjp", arrays, [g_w], eps.shape)
    return g_w


def sample_vjp(g: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_n g, sum_n g eps)`` (B, d) for g and eps (B, N, d)."""
    return _two_sums("sample_vjp", g, eps)
