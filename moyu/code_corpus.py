"""Source code for code models: the Python standard library that ships with the interpreter.

No download: the ``.py`` sources under ``sysconfig``'s ``stdlib`` path (site-packages,
test suites, IDLE, lib2to3, generated tables and the machine-specific
``_sysconfigdata*`` excluded). The split is by top-level module, so a package's files all
land on one side and calibration and evaluation share no module: a module is in ``eval``
when the SHA-256 of its name is odd, else in ``calib`` (about half each). Within a split,
files are ordered by the SHA-256 of their relative path (a fixed mix of modules, not
alphabetical) and each contributes at most its first :data:`MAX_FILE_CHARS` characters
(cut at a line end), so a few thousand tokens already span several modules.

The same Python version gives the same split and text on every machine;
:func:`corpus_info` records the version and a fingerprint of the selected sources.
"""
from __future__ import annotations

import hashlib
import platform
import sysconfig
from functools import lru_cache
from pathlib import Path

from .errors import MoyuError

SPLITS = ("calib", "eval")
MAX_FILE_CHARS = 8000
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                 "pydoc_data", "encodings", "ensurepip", "turtledemo", "__pycache__",
                 "__phello__", "lib-dynload"}
EXCLUDED_MODULES = {"__hello__", "this", "antigravity", "stringprep"}


def stdlib_dir() -> Path:
    """Folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_of(rel: Path) -> str:
    """Top-level module a stdlib file belongs to (``json/decoder.py`` -> ``json``)."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def split_of(module: str) -> str:
    """``eval`` or ``calib``: the fixed, hash-based side of a top-level module."""
    return "eval" if int(hashlib.sha256(module.encode()).hexdigest(), 16) % 2 else "calib"


@lru_cache(maxsize=4)
def _files(root: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(calib files, eval files)`` relative to ``root``, each in its fixed order."""
    base = Path(root)
    sides: dict[str, list[Path]] = {"calib": [], "eval": []}
    for p in base.rglob("*.py"):
        rel = p.relative_to(base)
        if (any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1])
                or rel.name.startswith("_sysconfigdata") or module_of(rel) in EXCLUDED_MODULES):
            continue
        sides[split_of(module_of(rel))].append(rel)
    order = lambda rel: hashlib.sha256(rel.as_posix().encode()).hexdigest()  # noqa: E731
    return tuple(tuple(r.as_posix() for r in sorted(sides[s], key=order)) for s in SPLITS)


def files(split: str) -> list[Path]:
    """Source files of one split, in their fixed order."""
    if split not in SPLITS:
        raise MoyuError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    root = stdlib_dir()
    calib, evals = _files(str(root)) if root.is_dir() else ((), ())
    if not calib or not evals:
        raise MoyuError(f"Python standard library sources not found under {root}: this interpreter "
                        "ships without them; pass --text FILE or use --corpus prose")
    return [root / f for f in (evals if split == "eval" else calib)]


def _head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1 if cut > 0 else limit]


def code_text(split: str = "eval", max_chars: int | None = None) -> str:
    """Text of one split: each file's head, prefixed by a ``# file: path`` line."""
    root = stdlib_dir()
    parts, total = [], 0
    for f in files(split):
        try:
            body = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        part = f"# file: {f.relative_to(root).as_posix()}\n{_head(body, MAX_FILE_CHARS)}"
        parts.append(part)
        total += len(part) + 1
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def corpus_info() -> dict:
    """Python version, module and file counts per split, and a SHA-256 of the selected files' names."""
    evals, calib = files("eval"), files("calib")
    root = stdlib_dir()
    names = "\n".join(f.relative_to(root).as_posix() for f in evals + calib)
    return {
        "source": f"Python {platform.python_version()} standard library",
        "python": platform.python_version(),
        "eval_files": len(evals), "calib_files": len(calib),
        "eval_modules": len({module_of(f.relative_to(root)) for f in evals}),
        "calib_modules": len({module_of(f.relative_to(root)) for f in calib}),
        "files_sha256": hashlib.sha256(names.encode()).hexdigest()[:16],
    }
