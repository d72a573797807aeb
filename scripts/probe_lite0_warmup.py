"""One warm-up run of the Lite0 SynthDrive experiment with other optimiser settings, scored on val and test.

The probes (docs/results.md) of why the Lite0 oracle stays weak (learning rate, warm-up length, Lovász, the head's
learning-rate multiplier; whether the loss bites after a better warm-up) were run with this script, one seed
each; they are not part of `sdca experiment`'s protocol (one seed, no sweep, the λ = 0 control as the only
control).

    python scripts/probe_lite0_warmup.py --domain real --steps 300 --lr 0.0025 --no-lovasz --out runs/probe

``--adapt-lambda L`` then runs init-stats and 100 adaptation steps from that warm-up at the settings the
experiment chose on validation (paper loss, full covariance, tau 0.5, delta 0.9, Eq. 5 mask, target batch-norm
statistics, lambda_feat = lambda_out = L; L = 0 is the control) and scores them too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=["sim", "real"], default="sim",
                        help="sim: source-only; real: the oracle (labelled real training frames)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01, help="backbone learning rate (the experiment's: 0.01)")
    parser.add_argument("--head-lr-mult", type=float, default=10.0, help="the ASPP head's multiplier (default 10)")
    parser.add_argument("--no-lovasz", action="store_true", help="cross-entropy only (lambda_lov = 0)")
    parser.add_argument("--adapt-lambda", type=float, default=None,
                        help="also adapt from the warm-up with lambda_feat = lambda_out = this (0: the control)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache", default="runs/synthdrive-cache", help="SynthDrive frame cache")
    parser.add_argument("--out", default="runs/probe")
    args = parser.parse_args()

    import torch

    from sdca.engine.builders import build_dataset
    from sdca.engine.demo import synthdrive_config
    from sdca.engine.evaluator import evaluate
    from sdca.engine.runner import Runner
    from sdca.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    name = (f"{'oracle' if args.domain == 'real' else 'source'}_{args.steps}_lr{args.lr:g}_head{args.head_lr_mult:g}"
            f"{'_nolov' if args.no_lovasz else ''}_s{args.seed}")
    plan = {"frames": (300, 300, 100), "iters": (args.steps, 100, 100), "batch": 4}
    cfg = synthdrive_config(os.path.join(args.out, name), plan, args.seed, os.path.abspath(args.cache),
                            source_domain=args.domain, val_split="val", model="lite0")
    cfg.solver.source.lr, cfg.solver.head_lr_mult = args.lr, args.head_lr_mult
    if args.no_lovasz:
        cfg.method.lambda_lov = 0.0

    def score(model) -> dict:
        out = {}
        for split in ("val", "test"):
            ds = build_dataset(dataclasses.replace(cfg.data.val, split=split), 19)
            out[split] = evaluate(model, ds, device=torch.device("cpu"), size=cfg.data.target_size, subsets=None,
                                  progress=False)["mIoU"]
        return out

    start = time.time()
    runner = Runner(cfg, progress=True)
    runner.train(["source"])
    scores = score(load_model(runner.final_path("source")))
    losses = [json.loads(line) for line in Path(os.path.join(args.out, name, "metrics.jsonl")).read_text().splitlines()]
    ce = [r["loss_ce"] for r in losses if r.get("stage") == "source" and "loss_ce" in r and "done" not in r]
    result = {"name": name, "val_mIoU": scores["val"], "test_mIoU": scores["test"], "first_ce": ce[0],
              "max_ce": max(ce), "last_ce": ce[-1], "seconds": round(time.time() - start, 1)}
    if args.adapt_lambda is not None:
        lam = args.adapt_lambda
        method = {"variant": "paper", "covariance": "full", "tau": 0.5, "delta": 0.9, "lambda_feat": lam,
                  "lambda_out": lam, "adaptation_bn": "target", "class_balanced_mask": False}
        if args.no_lovasz:
            method["lambda_lov"] = 0.0
        name = f"{name}_adapt_lam{lam:g}"
        cfg = synthdrive_config(os.path.join(args.out, name), plan, args.seed, os.path.abspath(args.cache),
                                val_split="val", model="lite0", method=method)
        cfg.solver.head_lr_mult = args.head_lr_mult
        start = time.time()
        adapter = Runner(cfg, progress=True, init_checkpoint=runner.final_path("source"))
        adapter.train(["init-stats", "adapt"])
        scores = score(load_model(adapter.final_path("adapt")))
        result = {"name": name, "warmup": result, "val_mIoU": scores["val"], "test_mIoU": scores["test"],
                  "seconds": round(time.time() - start, 1)}
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
