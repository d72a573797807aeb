"""The cost of adaptation: an adapt step against a source-only step on the same model and batch, in one run.

    python bench/bench_step.py                      # CPU, the demo scale (small model, 2 x 256x128 per domain)
    python bench/bench_step.py --device cuda        # GPU, ResNet-101 at the paper's per-GPU sizes
                                                    #   (one 1280x720 source + one 1024x512 target image)

Four steps, each in a fresh subprocess (time = median of --repeat after a warm-up; peak memory = CUDA peak
allocation, or the rise of peak RSS on the CPU, both from before the first step):
  source    : one forward/backward on the source batch, CE + Lovász (the warm-up stage's step);
  control   : the adapt step's forwards on both domains but only the source losses (no statistics, no SDCA);
  adapt     : the engine's real AdaptStep (statistics update + feature- and output-level SDCA losses);
  reference : the same AdaptStep on the pure-PyTorch reference ops (sdca.ops.reference_only());
  mean-teacher      : the one-stage stage's step (teacher forward, ClassMix, strong augmentation, two student
                      forwards, EMA), no contrastive term;
  mean-teacher-proj : the same with SDCA's loss on a projection head (one more student and teacher forward).
The adaptation overhead is (adapt - control) / source; the target is <= 25%. On CUDA the adapt worker also
profiles one step and reports the SDCA ops' share of its device time (torch.profiler, the sdca:: op events).
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


def make_setup(device: str, covariance: str, batch: int):
    from sdca.engine.builders import build_optimizer
    from sdca.engine.config import MethodConfig, SolverConfig, StageSolver
    from sdca.engine.distributed import DistInfo
    from sdca.engine.steps import AdaptStep, SupervisedStep
    from sdca.method import SemanticDistribution
    from sdca.models import build_model

    torch.manual_seed(0)
    if device == "cuda":
        model = build_model("deeplabv2_resnet101", 19, bn="train")
        src_hw, tgt_hw = (720, 1280), (512, 1024)
        # Random weights under frozen identity statistics overflow within a few steps through 101 layers: give
        # the batch norms statistics of their own inputs first, then freeze them (the paper's frozen BN).
        from sdca.models.layers import set_batchnorm_mode

        model = model.to(device).train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(2, 3, *tgt_hw, device=device))
        model = set_batchnorm_mode(model, "frozen")
    else:
        model = build_model("deeplabv2_small", 19, width=16)
        src_hw, tgt_hw = (128, 256), (128, 256)
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
    def reference(it):
        from sdca import ops

        with ops.reference_only():
            adapt_step.run_step(it)
    from sdca.engine.config import MeanTeacherConfig
    from sdca.engine.mean_teacher import MeanTeacherStep, make_teacher
    from sdca.models.projection import ProjectionHead

    def mean_teacher(contrast):
        # Built on first use: the teacher copies the model as it is then (and adds its memory to this kind only).
        cfg = MeanTeacherConfig(contrast=contrast, projection_dim=64)
        head = ProjectionHead(model.feature_dim, 64).to(dev) if contrast == "projection" else None
        stats = SemanticDistribution(19, 64 if head is not None else model.feature_dim, "diag", device=dev)
        teacher_head = make_teacher(head) if head is not None else None
        return MeanTeacherStep(model, optimizer, Same(src), Same(tgt), make_teacher(model), cfg, dev, None,
                               DistInfo(), projection=head, teacher_projection=teacher_head,
                               statistics=stats if contrast != "none" else None).run_step

    lazy = {}

    def mt(contrast):
        def run(it):
            if contrast not in lazy:
                lazy[contrast] = mean_teacher(contrast)
            return lazy[contrast](it)
        return run
    return {"source": source_step.run_step, "control": control, "adapt": adapt_step.run_step,
            "reference": reference, "mean-teacher": mt("none"), "mean-teacher-proj": mt("projection")}, model


def kernel_share(fn) -> dict:
    """One profiled step: device time inside the sdca:: ops (their kernels and the library calls they make)
    over the step's total device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(10_000)
        torch.cuda.synchronize()

    def attr(evt, name):
        return getattr(evt, name.replace("cuda", "device"), None) or getattr(evt, name, 0) or 0

    def nested_in_sdca(evt):
        parent = evt.cpu_parent
        while parent is not None:
            if parent.name.startswith("sdca::"):
                return True
            parent = parent.cpu_parent
        return False

    ops = {}
    for evt in prof.events():
        # The autograd kernel calls the op again below autograd: count only the outermost sdca:: event.
        if evt.name.startswith("sdca::") and not nested_in_sdca(evt):
            ops[evt.name] = ops.get(evt.name, 0.0) + attr(evt, "cuda_time_total")
    total = sum(attr(e, "self_cuda_time_total") for e in prof.key_averages())
    return {"sdca_ops_us": ops, "step_device_us": total,
            "sdca_share": sum(ops.values()) / total if total else float("nan")}


def measure(kind: str, device: str, covariance: str, repeat: int, batch: int) -> dict:
    steps, _ = make_setup(device, covariance, batch)
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
    result = {"time_s": statistics.median(times), "peak_extra_bytes": max(0, peak - base)}
    if device == "cuda" and kind == "adapt":
        result.update(kernel_share(fn))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--covariance", default="full", choices=["full", "diag"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, help="images per domain (default: 1 on CUDA, as the paper per GPU; "
                                                   "2 on the CPU)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker (the cores are shared)")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit with status 3 when the target is not met")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 1 if args.device == "cuda" else 2
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.worker, args.device, args.covariance, args.repeat, args.batch)))
        return 0
    results = {}
    for kind in ("source", "control", "adapt", "reference", "mean-teacher", "mean-teacher-proj"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--device", args.device, "--covariance",
               args.covariance, "--repeat", str(args.repeat), "--batch", str(args.batch), "--threads",
               str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{kind} step failed:\n{out.stderr}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    b = args.batch
    scale = (f"ResNet-101, {b} x 1280x720 + {b} x 1024x512" if args.device == "cuda"
             else f"small model, {b} + {b} x 256x128")
    print(f"device: {args.device}, {scale}, covariance: {args.covariance}, {args.threads} thread(s)")
    for kind, r in results.items():
        print(f"{kind:<17} {r['time_s'] * 1000:9.1f} ms   peak extra memory {r['peak_extra_bytes'] / 2**20:8.1f} MiB")
    overhead = (results["adapt"]["time_s"] - results["control"]["time_s"]) / results["source"]["time_s"]
    met = overhead <= 0.25
    print(f"adaptation overhead (adapt - control) / source = {100 * overhead:.1f}% "
          f"(target <= 25%: {'met' if met else 'NOT met'}); "
          f"adapt / source = {results['adapt']['time_s'] / results['source']['time_s']:.2f}x; "
          f"reference ops / extension = {results['reference']['time_s'] / results['adapt']['time_s']:.2f}x time, "
          f"{results['reference']['peak_extra_bytes'] / max(results['adapt']['peak_extra_bytes'], 1):.2f}x memory")
    print(f"mean-teacher step / source = {results['mean-teacher']['time_s'] / results['source']['time_s']:.2f}x, "
          f"/ adapt = {results['mean-teacher']['time_s'] / results['adapt']['time_s']:.2f}x; with SDCA's loss on a "
          f"projection head / source = {results['mean-teacher-proj']['time_s'] / results['source']['time_s']:.2f}x")
    share = results["adapt"].get("sdca_share")
    if share is not None:
        per_op = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in results["adapt"]["sdca_ops_us"].items())
        print(f"sdca ops' share of the adapt step's device time: {100 * share:.1f}% ({per_op}; step "
              f"{results['adapt']['step_device_us'] / 1e3:.1f} ms of device time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": scale, "covariance": args.covariance, "results": results, "overhead": overhead,
                       "target_met": met}, f, indent=2)
    return 3 if args.fail_on_miss and not met else 0


if __name__ == "__main__":
    sys.exit(main())
