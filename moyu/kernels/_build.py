"""Builds (once, cached) and loads the C++ extension; picks the backend.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into
``$MOYU_CACHE/kernels/<name>`` (``MOYU_CACHE`` defaults to ``~/.cache/moyu``). The name
encodes the instruction set the code was compiled for, so a cache directory shared by
machines with different CPUs never hands one of them a binary it cannot run.

Concurrency and crash safety: torch guards a build with a ``lock`` file that a killed
build leaves behind, after which every later build waits forever. We therefore hold an
``fcntl`` lock (released by the kernel when a process dies) around the whole build and,
while holding it, clear any stale torch lock. A library is only trusted if it is the one a
previous process loaded successfully (its size and mtime are recorded next to it): a
half-written library from a killed link can crash the process (SIGBUS) when imported, so
an unrecorded one makes us wipe the build directory and rebuild.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

_SOURCE = Path(__file__).with_name("sparse_kernels.cpp")
_QUANT_SOURCE = Path(__file__).with_name("quant_kernels.cpp")
_ENV_BACKEND = "MOYU_KERNELS"
_MARKER = "moyu-loaded.json"


def cache_dir() -> Path:
    """Directory that holds the compiled kernels (``$MOYU_CACHE/kernels``)."""
    from ..paths import cache_dir as root
    return root() / "kernels"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_flags() -> tuple[str, list[str]]:
    """(tag, compiler flags) for the widest instruction set the kernels use here."""
    if {"avx2", "fma", "f16c"} <= _cpu_flags():
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "generic", []


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Process-exclusive lock on ``path``, released automatically if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's own baton
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Captures Python-level stdout/stderr chatter from torch's build helpers."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def _compile(name: str, build_dir: Path, flags: list[str], source: Path = _SOURCE) -> ModuleType:
    import warnings

    from torch.utils import cpp_extension

    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _trusted(build_dir: Path) -> bool:
    """True if every library in build_dir is one a previous load recorded."""
    try:
        recorded = json.loads((build_dir / _MARKER).read_text())
    except (OSError, ValueError):
        recorded = {}
    return all(recorded.get(so.name) == _fingerprint(so) for so in build_dir.glob("*.so"))


def _record(build_dir: Path, module: ModuleType) -> None:
    so = Path(module.__file__ or "").resolve()
    if so.parent == build_dir.resolve() and so.is_file():
        tmp = build_dir / f"{_MARKER}.tmp"
        tmp.write_text(json.dumps({so.name: _fingerprint(so)}))
        os.replace(tmp, build_dir / _MARKER)


def extension_name() -> str:
    """Build name: instruction set and source hash, so no build is shared by different
    CPUs or different sources (two checkouts never rebuild over each other)."""
    return f"moyu_sparse_{_isa_flags()[0]}_{_digest(_SOURCE)}"


def _digest(source: Path) -> str:
    """Hash of a source file's bytes, of its path and of the kernels' headers: torch's build
    files name the source by path, so two checkouts sharing one build directory would
    rebuild over each other."""
    h = hashlib.sha256(str(source.resolve()).encode() + source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):   # the headers both sources include
        h.update(header.name.encode() + header.read_bytes())
    return h.hexdigest()[:10]


def quant_extension_name() -> str:
    """Build name of the quantized kernels. They are compiled for the baseline x86-64
    instruction set and choose their AVX2 / AVX-512 VNNI code path at run time from the
    CPU's flags, so one build is safe on every CPU: the tag says so, the hash keys the source."""
    return f"moyu_quant_rtdispatch_{_digest(_QUANT_SOURCE)}"


def build_extension() -> ModuleType:
    """Compiles (or reuses the cached build of) the kernels and returns the module."""
    _tag, flags = _isa_flags()
    return _build_at(extension_name(), _SOURCE, flags)


def build_quant_extension() -> ModuleType:
    """Compiles (or reuses the cached build of) the quantized kernels (quant_kernels.cpp)."""
    return _build_at(quant_extension_name(), _QUANT_SOURCE, [])


def _build_at(name: str, source: Path, flags: list[str]) -> ModuleType:
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir.parent / f"{name}.flock"):
        (build_dir / "lock").unlink(missing_ok=True)  # stale torch baton from a killed build
        if not _trusted(build_dir):
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
        module = _compile(name, build_dir, flags, source)
        _record(build_dir, module)
        return module


def _reason(exc: BaseException) -> str:
    """One short line describing why a build failed."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    line = (errors or lines or [type(exc).__name__])[0]
    return line if len(line) <= 200 else line[:197] + "..."


def load_backend(builder: Callable[[], ModuleType] = build_extension,
                 what: str = "sparse kernel") -> ModuleType | None:
    """The compiled extension, or None for the PyTorch fallback (per ``MOYU_KERNELS``).

    ``MOYU_KERNELS=torch`` forces the fallback, ``cpp`` forces the extension (a failed
    build raises), anything else tries the extension and falls back with one warning.
    """
    choice = os.environ.get(_ENV_BACKEND, "auto").strip().lower()
    if choice == "torch":
        return None
    try:
        return builder()
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
        if choice == "cpp":
            raise RuntimeError(f"moyu: {what} build failed ({_reason(exc)}) "
                               f"and {_ENV_BACKEND}=cpp forbids the fallback") from exc
        print(f"moyu: warning: {what} build failed ({_reason(exc)}); "
              "using the PyTorch fallback", file=sys.stderr)
        return None
