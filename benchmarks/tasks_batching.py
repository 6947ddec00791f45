"""``moyu tasks``' log-likelihood pass with the choices of a context batched (and, dense,
several items sharing a prefill batch), beside one choice at a time: CPU and wall seconds,
and whether the scores agree.

    python benchmarks/tasks_batching.py --limit 8 --threads 1

Both run lm-eval's own requests of the nine multiple-choice tasks (first ``--limit``
items each), dense and with ``--method`` at ``--sparsity`` (calibrated on 2,048 tokens),
each way; the most batched pass runs twice (first and last) so a change in the machine's
load shows. Ways: ``items`` (items of similar length share one prefill and one tail batch), ``choices`` (the choices of one item share a tail batch), ``one``.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="griffin")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import moyu
    from moyu import tasks as T
    from moyu.evaluate import Windows
    from moyu.methods import calibrate, calibration_ids, sparsify

    T._offline()
    T._quiet_lm_eval()
    from lm_eval.tasks import TaskManager
    model, tok = moyu.load(args.model, verbose=False)
    configs = [c for n in T.DEFAULT_TASKS for c in T.task_configs(n)]
    reqs = []
    for task in TaskManager(include_defaults=False).load(configs)["tasks"].values():
        task.build_all_requests(limit=args.limit, rank=0, world_size=1)
        reqs += list(task.instances)
    prof = calibrate(model, calibration_ids(tok, 2048), method=args.method, sparsity=args.sparsity,
                     windows=Windows(256, 256))
    sp = sparsify(model, prof)
    out = {"requests": len(reqs), "limit": args.limit, "threads": args.threads, "runs": []}
    ways = {"items": (True, True), "choices": (True, False), "one": (False, False)}
    for label, mod in (("dense", None), (f"{args.method} {args.sparsity:.0%}", sp)):
        order = ["items", "choices", "one", "items"]
        got = {}
        for way in order:
            batch, items = ways[way]
            lm = T.harness_model(model, tok, mod, progress=False, batch_choices=batch, batch_items=items)
            t0, c0 = time.perf_counter(), time.process_time()
            if mod is None:
                got[way] = lm.loglikelihood(reqs)
            else:
                with sp:
                    got[way] = lm.loglikelihood(reqs)
            out["runs"].append({"pass": label, "way": way, "wall_s": round(time.perf_counter() - t0, 1),
                                "cpu_s": round(time.process_time() - c0, 1)})
        a, b = got[order[0]], got["one"]
        out["runs"][-1].update(greedy_equal=[g for _, g in a] == [g for _, g in b],
                               max_abs_loglik_diff=max(abs(x[0] - y[0]) for x, y in zip(a, b)))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
