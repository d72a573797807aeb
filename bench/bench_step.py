"""The cost of adaptation: an adapt step against a source-only step on the same model and batch, in one run.

    python bench/bench_step.py                      # CPU, the demo scale (small model, 2 x 256x128 per domain)
    python bench/bench_step.py --device cuda        # GPU, ResNet-101 at the paper's sizes
                                                    #   (1280x720 source, 1024x512 target, 2 images each)

Three steps, each in a fresh subprocess (time = median of --repeat after a warm-up; peak memory = CUDA peak
allocation, or the rise of peak RSS on the CPU, both from before the first step):
  source  : one forward/backward on the source batch, CE + Lovász (the warm-up stage's step);
  control : the adapt step's forwards on both domains but only the source losses (no statistics, no SDCA);
  adapt   : the engine's real AdaptStep (statistics update + feature- and output-level SDCA losses).
The adaptation overhead is (adapt - control) / source; the target is <= 25%.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def make_setup(device: str, covariance: str):
    from sdca.engine.builders import build_optimizer
    from sdca.engine.config import MethodConfig, SolverConfig, StageSolver
    from sdca.engine.distributed import DistInfo
    from sdca.engine.steps import AdaptStep, SupervisedStep
    from sdca.method import SemanticDistribution
    from sdca.models import build_model

    torch.manual_seed(0)
    if device == "cuda":
        model = build_model("deeplabv2_resnet101", 19, bn="frozen")
        src_hw, tgt_hw, batch = (720, 1280), (512, 1024), 2
    else:
        model = build_model("deeplabv2_small", 19, width=16)
        src_hw, tgt_hw, batch = (128, 256), (128, 256), 2
    model = model.to(device).train()
    gen = torch.Generator().manual_seed(0)
    src = {"image": torch.rand(batch, 3, *src_hw, generator=gen), "label": torch.randint(19, (batch, *src_hw), generator=gen)}
    tgt = {"image": torch.rand(batch, 3, *tgt_hw, generator=gen)}

    class Same:
        def __init__(self, b):
            self.b = b

        def __next__(self):
            return self.b

    optimizer = build_optimizer(model, SolverConfig(), StageSolver(lr=1e-6))
    dev = torch.device(device)
    method = MethodConfig(variant="paper", covariance=covariance, tau=0.1)
    feat = SemanticDistribution(19, model.feature_dim, covariance, device=dev)
    out = SemanticDistribution(19, 19, covariance, device=dev)
    for s in (feat, out):  # statistics as after init-stats: every class seen
        rows = torch.nn.functional.normalize(torch.randn(4000, s.dim, device=dev), dim=1)
        s.update(rows, torch.arange(4000, device=dev) % 19)
    source_step = SupervisedStep(model, optimizer, Same(src), dev, None, DistInfo(), 0.75)
    adapt_step = AdaptStep(model, optimizer, Same(src), Same(tgt), feat, out, method, dev, None, DistInfo())

    def control(it):
        labels = src["label"].to(dev)
        s_out = model(model.info.normalization(src["image"].to(dev)))
        t_out = model(model.info.normalization(tgt["image"].to(dev)))
        terms = source_step.supervised_terms(s_out.logits, labels, 0.75)
        # keep the target forward in the graph (as the adapt step does) at zero weight
        total = terms["loss_ce"] + 0.75 * terms["loss_lovasz"] + 0.0 * t_out.logits.float().mean()
        source_step.update(total)
    return {"source": source_step.run_step, "control": control, "adapt": adapt_step.run_step}, model


def measure(kind: str, device: str, covariance: str, repeat: int) -> dict:
    steps, _ = make_setup(device, covariance)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn = steps[kind]
    sync()
    # Memory from before the first step: the same set-up precedes all three kinds, so they compare like for like.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    fn(0)
    sync()
    times = []
    for i in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn(i + 1)
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"time_s": statistics.median(times), "peak_extra_bytes": max(0, peak - base)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--covariance", default="full", choices=["full", "diag"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.device, args.covariance, args.repeat)))
        return 0
    results = {}
    for kind in ("source", "control", "adapt"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--device", args.device, "--covariance",
               args.covariance, "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{kind} step failed:\n{out.stderr}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    scale = "ResNet-101, 2 x 1280x720 + 2 x 1024x512" if args.device == "cuda" else "small model, 2 + 2 x 256x128"
    print(f"device: {args.device}, {scale}, covariance: {args.covariance}")
    for kind, r in results.items():
        print(f"{kind:<8} {r['time_s'] * 1000:9.1f} ms   peak extra memory {r['peak_extra_bytes'] / 2**20:8.1f} MiB")
    overhead = (results["adapt"]["time_s"] - results["control"]["time_s"]) / results["source"]["time_s"]
    print(f"adaptation overhead (adapt - control) / source = {100 * overhead:.1f}% "
          f"(target <= 25%: {'met' if overhead <= 0.25 else 'NOT met'}); "
          f"adapt / source = {results['adapt']['time_s'] / results['source']['time_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
