"""The training engine on a GPU, bounded: every stage of gta5_cityscapes_r101 on fabricated paper-size data.

    python scripts/train_check.py --out DIR [--iters 24] [--smoke]

Run by scripts/train_check.sh (which builds the extension first). What it does, in this order, each part
writing into DIR and into report.json / report.txt:

1. data: a GTA5 tree at 1914x1052 (labelIds; one label of another size, one truncated frame) and a Cityscapes
   tree at 2048x1024 (train, val with gtFine labelIds), and an ImageNet-shaped ResNet-101 file (torchvision's
   layout, random values);
2. fp32: source, init-stats, adapt, pseudo-label, self-train (restarted from the "ImageNet" file, as the
   preset does) for ``--iters`` steps each, one process;
3. adapt with --amp bf16 and --amp fp16 from the same init-stats checkpoint;
4. SIGTERM mid-adapt (the CLI in a subprocess) and a resume: exit 143, last.pt, then the resumed losses against
   the uninterrupted fp32 adapt run (within 2%);
5. two ranks on the one GPU (torchrun, gloo on CUDA tensors: NCCL refuses two ranks on one device) through
   source and adapt, and a world of one under NCCL (every collective on NCCL), ranks agreeing throughout;
6. forced host syncs per adaptation step (torch.cuda.set_sync_debug_mode), and the loader's images/s (bench/
   bench_loader.py) beside the step's.

Per stage and precision: step ms, data-wait share, images/s, peak GiB, ranks agree. Exit 1 on any failure:
a non-zero exit, a non-finite loss in fp32/bf16, a missing output, the reference ops in use instead of the
extension, a rank disagreement, resumed losses off by more than 2%.

``--smoke`` runs the same on the CPU at toy sizes (to check the script itself; it measures nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def fabricate(out, n_gta, n_city, n_val, gta_size, city_size):
    """The trees, in parallel over frames (PNG encoding is the slow part)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for i in range(n_gta):
        jobs.append(("gta", i, gta_size))
    for split, n in (("train", n_city), ("val", n_val)):
        for i in range(n):
            jobs.append((split, i, city_size))
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_frame, [(out, *j) for j in jobs]))
    # One GTA5 label of another size (resized and reported by the loader) and one truncated frame (skipped).
    w, h = gta_size
    Image.fromarray(np.full((h // 2, w // 2), 7, np.uint8)).save(os.path.join(out, "gta5", "labels", "00001.png"))
    frame = os.path.join(out, "gta5", "images", "00002.png")
    data = Path(frame).read_bytes()
    Path(frame).write_bytes(data[: len(data) // 3])


def _write_frame(args):
    out, split, i, (w, h) = args
    rng = np.random.default_rng(i + (0 if split == "gta" else 1000 if split == "train" else 2000))
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.float32)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    ids = np.array([7, 8, 11, 21, 23, 24, 26], np.uint8)  # road, sidewalk, building, vegetation, sky, person, car
    blocks = rng.integers(0, len(ids), (h // 32 + 1, w // 32 + 1))
    label = ids[np.kron(blocks, np.ones((32, 32), np.int64))[:h, :w]]
    if split == "gta":
        paths = (f"gta5/images/{i:05d}.png", f"gta5/labels/{i:05d}.png")
    else:
        name = f"city_{i:06d}_000019"
        paths = (f"cityscapes/leftImg8bit/{split}/city/{name}_leftImg8bit.png",
                 f"cityscapes/gtFine/{split}/city/{name}_gtFine_labelIds.png")
    for array, rel in ((image, paths[0]), (label, paths[1])):
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)


def imagenet_shaped_resnet101():
    """torchvision's ResNet-101 layout with random weights, conditioned the way trained ImageNet weights are:
    batch-norm statistics estimated on random images (as AdaBN would) and each block's last batch-norm scale
    small. Raw initialisation under the presets' frozen batch norm lets activations grow through 101 layers
    (features ~1e4, the loss NaN by the second step), which no real ImageNet file does."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet101(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(4, 3, 160, 160))
    with torch.no_grad():  # residual branches start small, as trained ImageNet weights have them
        for block in [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]:
            block.bn3.weight.mul_(0.2)
            block.bn3.bias.mul_(0.2)
    return model.state_dict()


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def stage_figures(run_dir, stage, images_per_step):
    """Step ms, data-wait share and images/s of a stage, from its metrics lines (log period means)."""
    lines = [r for r in metrics(run_dir) if r.get("stage") == stage and "time" in r and "loss_ce" in r]
    if len(lines) < 2:
        return {}
    a, b = lines[0], lines[-1]  # the first period includes start-up (cuDNN autotuning, workers): left out
    steps, seconds = b["step"] - a["step"], b["time"] - a["time"]
    step_s = seconds / max(steps, 1)
    wait = float(np.mean([r.get("time_data", 0.0) for r in lines[1:]]))
    finite = all(math.isfinite(r[k]) for r in lines for k in r if k.startswith("loss_"))
    return {"step_ms": round(1e3 * step_s, 1), "data_wait_share": round(wait / step_s, 3) if step_s else None,
            "images_per_s": round(images_per_step / step_s, 2) if step_s else None, "finite": finite,
            "losses": {r["step"]: r["loss_ce"] for r in lines}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=24)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the script, measures nothing")
    args = parser.parse_args(argv)
    import torch

    from sdca.engine import Runner, load_config

    device = "cpu" if args.smoke else "cuda"
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    report = {"device": device, "failures": [], "stages": {}}
    fail = report["failures"].append
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def step(name):
        print(f"== {name} ({time.strftime('%H:%M:%S')})", flush=True)

    if not args.smoke:
        from sdca.ops._loader import backends, extension_error

        report["ops_backends"] = backends()
        if "cuda" not in backends()["devices"] or os.environ.get("SDCA_FORCE_REFERENCE") == "1":
            fail(f"the SDCA ops would fall back to the reference implementation on CUDA ({backends()}, "
                 f"{extension_error()})")

    step("data")
    data = os.path.join(out, "data")
    gta_size, city_size = ((96, 52), (128, 64)) if args.smoke else ((1914, 1052), (2048, 1024))
    n = 6 if args.smoke else 24
    if not os.path.isdir(os.path.join(data, "gta5")):
        fabricate(data, n, n, 4, gta_size, city_size)
    weights = os.path.join(data, "resnet101-imagenet-shaped.pth")
    if not os.path.isfile(weights):
        torch.save(imagenet_shaped_resnet101(), weights)
    iters = 3 if args.smoke else args.iters
    src, tgt = ((96, 52), (128, 64)) if args.smoke else ((1280, 720), (1024, 512))
    base = {
        "base": "gta5_cityscapes_r101", "name": "fp32", "output_dir": os.path.join(out, "runs"), "device": device,
        "model": {"pretrained": weights},
        "data": {"source": {"kind": "gta5", "root": os.path.join(data, "gta5")},
                 "target": {"kind": "cityscapes", "root": os.path.join(data, "cityscapes"), "split": "train",
                            "labelled": False},
                 "val": {"kind": "cityscapes", "root": os.path.join(data, "cityscapes"), "split": "val"},
                 "source_size": list(src), "target_size": list(tgt),
                 "stages": {"self_train": {"crop": list(tgt)}}},
        "solver": {s: {"iters": iters, "schedule_iters": 10 * iters} for s in ("source", "adapt", "self_train")},
        "eval": {"size": list(tgt), "batch_size": 2},
    }
    base["solver"].update(checkpoint_period=max(1, iters // 3), log_period=max(1, iters // 6))
    cfg_path = os.path.join(out, "fp32.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(base, f)
    images = {"source": 2, "adapt": 2, "self-train": 2}  # per process per step: the preset's batch sizes

    class Measuring(Runner):
        def _train_stage(self, stage, model, solver, make_step, statistics=None):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            super()._train_stage(stage, model, solver, make_step, statistics)
            entry = report["stages"].setdefault(f"{self.cfg.name}/{stage}", {})
            if device == "cuda":
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)

    step("fp32: every stage, one process")
    try:
        Measuring(load_config(cfg_path), progress=False).train()
    except Exception as exc:
        fail(f"fp32 pipeline: {type(exc).__name__}: {exc}")
    run = os.path.join(out, "runs", "fp32")
    for stage in ("source", "init-stats", "adapt", "self-train"):
        if not os.path.isfile(os.path.join(run, stage, "final.pt")):
            fail(f"fp32: {stage}/final.pt missing")
    if not os.path.isfile(os.path.join(run, "pseudo-label", "thresholds.json")):
        fail("fp32: pseudo-label/thresholds.json missing")
    for stage in ("source", "adapt", "self-train"):
        figures = stage_figures(run, stage, images[stage])
        report["stages"].setdefault(f"fp32/{stage}", {}).update({k: v for k, v in figures.items() if k != "losses"})
        if figures and not figures["finite"]:
            fail(f"fp32 {stage}: a non-finite loss")
    init = os.path.join(run, "init-stats", "final.pt")

    for amp in ("bf16", "fp16"):
        step(f"adapt with --amp {amp}")
        cfg = load_config(cfg_path, [], name=amp, amp=amp, stages=["adapt"])
        try:
            Measuring(cfg, progress=False, init_checkpoint=init).train()
        except Exception as exc:
            fail(f"{amp} adapt: {type(exc).__name__}: {exc}")
        figures = stage_figures(os.path.join(out, "runs", amp), "adapt", images["adapt"])
        report["stages"].setdefault(f"{amp}/adapt", {}).update({k: v for k, v in figures.items() if k != "losses"})
        if amp == "bf16" and figures and not figures["finite"]:
            fail("bf16 adapt: a non-finite loss")

    step("SIGTERM mid-adapt, then resume")
    long_iters = max(3 * iters, 6)
    cli = [sys.executable, "-m", "sdca", "train", cfg_path, "--quiet", "--stage", "adapt", "--init", init,
           "--name", "resumed", "--set", f"solver.adapt.iters={long_iters}", "--set", "solver.log_period=1"]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    resumed_dir = os.path.join(out, "runs", "resumed")
    deadline = time.time() + 240
    while time.time() < deadline and len([r for r in metrics(resumed_dir) if "loss_ce" in r]) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 143 or not os.path.isfile(os.path.join(resumed_dir, "adapt", "last.pt")):
        fail(f"SIGTERM: exit {proc.returncode}, last.pt {'present' if os.path.isdir(resumed_dir) else 'missing'}: "
             f"{err[-500:]}")
    again = subprocess.run(cli, capture_output=True, text=True, timeout=300, env=env)
    straight = subprocess.run([*cli[:-6], "--name", "straight", "--set", f"solver.adapt.iters={long_iters}", "--set",
                               "solver.log_period=1"], capture_output=True, text=True, timeout=300, env=env)
    for name, result in (("resume", again), ("uninterrupted", straight)):
        if result.returncode != 0:
            fail(f"{name} adapt: exit {result.returncode}: {result.stderr[-500:]}")
    a = {r["step"]: r["loss_ce"] for r in metrics(os.path.join(out, "runs", "straight")) if "loss_ce" in r}
    b = {r["step"]: r["loss_ce"] for r in metrics(resumed_dir) if "loss_ce" in r}
    common = sorted(set(a) & set(b))
    worst = max((abs(b[s] - a[s]) / max(abs(a[s]), 1e-12) for s in common), default=None)
    report["resume"] = {"steps_compared": len(common), "worst_relative_loss_difference": worst}
    if worst is None or worst > 0.02:
        fail(f"resumed losses differ from the uninterrupted run's by {worst} (limit 0.02)")

    step("two ranks on one GPU (gloo on CUDA tensors), and NCCL in a world of one")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    worlds = {"gloo x2": (["--nproc-per-node", "2"], {"SDCA_DIST_BACKEND": "gloo"}),
              "nccl x1": (["--nproc-per-node", "1"], {"SDCA_FORCE_DISTRIBUTED": "1"})}
    if args.smoke:
        worlds = {"gloo x2": worlds["gloo x2"]}
    for name, (nproc, extra) in worlds.items():
        tag = name.replace(" ", "")
        cmd = [torchrun, *nproc, "--master-port", str(29600 + len(tag)), "-m", "sdca", "train", cfg_path, "--quiet",
               "--name", tag, "--stage", "source", "--stage", "init-stats", "--stage", "adapt",
               "--set", "data.stages.source.batch_size=1", "--set", "data.stages.adapt.batch_size=1"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                env={**env, "SDCA_STRICT_COLLECTIVES": "1", **extra})
        agree = result.returncode == 0 and "ranks disagree" not in result.stderr
        report["stages"].setdefault(f"{tag}/adapt", {})["ranks_agree"] = agree
        figures = stage_figures(os.path.join(out, "runs", tag), "adapt", 2)
        report["stages"][f"{tag}/adapt"].update({k: v for k, v in figures.items() if k != "losses"})
        if not agree:
            fail(f"{name}: exit {result.returncode}: {result.stderr[-800:]}")

    if not args.smoke:
        step("forced host syncs per adaptation step")
        report["syncs_per_adapt_step"] = count_syncs(load_config(cfg_path, [], name="syncs", stages=["adapt"]), init)

    report["ok"] = not report["failures"]
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"train_check on {device}: {'OK' if report['ok'] else 'FAILED'}"]
    lines += [f"  failure: {m}" for m in report["failures"]]
    lines.append(f"{'run/stage':<22} {'step ms':>8} {'wait':>6} {'img/s':>7} {'peak GiB':>9} {'ranks agree':>12}")
    for key, v in report["stages"].items():
        lines.append(f"{key:<22} {v.get('step_ms', '-')!s:>8} {v.get('data_wait_share', '-')!s:>6} "
                     f"{v.get('images_per_s', '-')!s:>7} {v.get('peak_gib', '-')!s:>9} {v.get('ranks_agree', '-')!s:>12}")
    if "resume" in report:
        lines.append(f"resume: worst relative loss difference {report['resume']['worst_relative_loss_difference']}")
    if "syncs_per_adapt_step" in report:
        lines.append(f"forced host syncs per adaptation step: {report['syncs_per_adapt_step']}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(text + "\n")
    return 0 if report["ok"] else 1


def count_syncs(cfg, init, steps=6):
    """Host synchronisations per adaptation step, as torch.cuda.set_sync_debug_mode('warn') reports them
    (the steps after the first, which also builds and tunes)."""
    import torch

    from sdca.engine import Runner

    counts = []

    class Counting(Runner):
        def _train_stage(self, stage, model, solver, make_step, statistics=None):
            def counted(optimizer, consumed):
                inner = make_step(optimizer, consumed)
                real = inner.run_step

                def run_step(iteration):
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        torch.cuda.set_sync_debug_mode("warn")
                        try:
                            out = real(iteration)
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                    counts.append(sum("synchroniz" in str(w.message) for w in caught))
                    return out
                inner.run_step = run_step
                return inner
            super()._train_stage(stage, model, solver, counted, statistics)

    cfg.solver.adapt.iters = steps
    Counting(cfg, progress=False, init_checkpoint=init).train()
    return counts[1:]


if __name__ == "__main__":
    sys.exit(main())
