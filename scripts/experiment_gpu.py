"""The Lite0 experiment's key rows at a scale the 2-core CPU cannot reach (issue: one-stage adaptation), for a GPU.

    python scripts/experiment_gpu.py --out DIR [--size 512x256] [--scale 10] [--seed 0] [--smoke]

One seed; SynthDrive sim -> real at --size (default 512x256, the CPU experiment's 384x192 scaled up), every
step count of the CPU Lite0 plan times --scale (default 10: warm-up 3,000, adapt 1,000, self-training 1,000,
mean teacher 1,000), bf16 autocast on CUDA. Rows: source-only, oracle (target labels), AdaBN, SDCA adapt, SDCA +
self-training, mean teacher (no contrast), mean teacher + SDCA loss on a projection head. Nothing is chosen
here: the warm-up trains batch norm and SDCA takes the CPU experiment's validation choices (adaptation_bn target,
lambda 0.1, tau 0.5, Eq. 5 mask), the
mean teacher the recipe's defaults (alpha 0.999, threshold 0.968; contrast lambda 1, tau 100, SePiCo's). Each row
is saved as it finishes (rerun to resume); DIR/table.md and DIR/table.json hold the test-split mIoU and each
row's seconds. --smoke: a CPU-sized run (tiny frames and steps) that checks the plumbing and measures nothing.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sdca.engine.experiment import LITE0_PLAN, Experiment
from sdca.engine.plan import Plan

SDCA_CHOICE = {"bn": "target", "lam": 0.1, "tau": 0.5}
MT_PLAIN = {"alpha": 0.999, "thr": 0.968}
MT_PROJ = dict(MT_PLAIN, contrast="projection", lam=1.0, tau=100.0)
ROWS = [("source", "source-only"), ("oracle", "oracle (target labels)"), ("adabn", "AdaBN"),
        ("sdca", "SDCA adapt (paper loss)"), ("sdca_st", "SDCA + self-training"),
        ("mt", "mean teacher (no contrast)"), ("mt_proj", "mean teacher + SDCA loss, projection head")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs") + "/experiment-gpu")
    ap.add_argument("--size", default="512x256", help="frame size WxH")
    ap.add_argument("--scale", type=int, default=10, help="steps x the CPU Lite0 plan's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: plumbing only")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke to check the plumbing on the CPU", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.smoke:
        plan = Plan(16, 16, 8, source_iters=6, adapt_iters=3, self_train_iters=3, batch=2, mean_teacher_iters=3)
        width, height = 128, 64
    else:
        plan = LITE0_PLAN.scaled(args.scale)
    exp = Experiment(args.out, model="lite0", plan=plan, device="cuda" if cuda else "cpu",
                     frame_size=(width, height), amp="bf16" if cuda else None, warmup_bn="train")
    s = args.seed
    runs = {"source": lambda: exp.source(s), "oracle": lambda: exp.source(s, "real"), "adabn": lambda: exp.adabn(s),
            "sdca": lambda: exp.adapt(f"s{s}_sdca", s, "paper", SDCA_CHOICE),
            "sdca_st": lambda: exp.self_train(f"s{s}_sdca_st", s, exp.result(f"s{s}_sdca")),
            "mt": lambda: exp.mean_teacher(f"s{s}_mt", s, MT_PLAIN),
            "mt_proj": lambda: exp.mean_teacher(f"s{s}_mt_proj", s, MT_PROJ)}
    table = {}
    start = time.time()
    for key, label in ROWS:
        t = time.time()
        result = runs[key]()
        table[key] = {"label": label, "test": 100 * (result["test"]["mIoU"] or 0.0),
                      "val": 100 * (result["val"]["mIoU"] or 0.0), "seconds": result.get("seconds")}
        print(f"{label}: test {table[key]['test']:.1f} val {table[key]['val']:.1f} ({time.time() - t:.0f} s)",
              flush=True)
    device = torch.cuda.get_device_name() if cuda else "CPU (smoke)"

    lines = [f"# SynthDrive sim -> real, deeplabv2_lite0 at {width}x{height}, seed {s}, on {device}", "",
             f"Steps: warm-up {plan.source_iters}, adapt {plan.adapt_iters}, self-training {plan.self_train_iters}, mean "
             f"teacher {plan.mt_iters}; batch "
             f"{plan.batch} per domain; {'bf16 autocast' if cuda else 'float32'}. Total {time.time() - start:.0f} s.",
             "", "| row | test mIoU | val mIoU | seconds |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['label']} | {r['test']:.1f} | {r['val']:.1f} | {r['seconds']} |" for r in table.values()]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"device": device, "size": [width, height], "plan": plan.to_dict(), "rows": table}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
