"""Where moyu keeps what it makes once and reuses: ``$MOYU_CACHE`` (default ``~/.cache/moyu``)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of moyu's cache: ``$MOYU_CACHE`` or ``~/.cache/moyu`` (models, data, kernels)."""
    return Path(os.environ.get("MOYU_CACHE") or Path.home() / ".cache" / "moyu").expanduser()
