"""Inference speed, measured side by side in one run at 1024x512 (random weights are fine for speed).

    python bench/bench_infer.py                 # CPU: the demo model, EfficientNet-Lite0 and ResNet-101
    python bench/bench_infer.py --device cuda   # GPU: PyTorch on CUDA vs the ONNX Runtime CUDA provider

For each model, from the same preprocessed batch to a label map: PyTorch eager (model, upsampling, argmax) vs
ONNX Runtime on the model exported with the in-graph argmax (target >= 1.2x on the CPU); and `sdca infer` end
to end over a folder of PNG frames (decode, preprocess, infer, colour PNG encode, overlapped) vs that bare
session (target >= 85%: I/O hidden behind compute). Lite0 vs ResNet-101: ONNX Runtime frames/s of the two in
this run (target: Lite0 >= 5x).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def timed(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(arch, device, frames, repeat, batch, width=16):
    from sdca.deploy.infer import run_inference
    from sdca.deploy.onnx_export import export_onnx
    from sdca.deploy.runtime import OnnxSegmenter, preprocess
    from sdca.models import build_model, upsample_logits

    torch.manual_seed(0)
    model = build_model(arch, 19, width=width).eval().to(device)
    h, w = 512, 1024
    rng = np.random.default_rng(0)
    batch_frames = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "m.onnx")
        export_onnx(model.cpu(), onnx_path, output="labels", check=False)
        model.to(device)
        seg = OnnxSegmenter(onnx_path, device="cuda" if device == "cuda" else "cpu")
        x = torch.from_numpy(preprocess(batch_frames, seg.info)).to(device)

        def eager():
            with torch.no_grad():
                upsample_logits(model(x).logits, (h, w)).argmax(1).cpu()
            if device == "cuda":
                torch.cuda.synchronize()
        t_eager = timed(eager, repeat) / batch
        feed = {seg.input_name: x.cpu().numpy()}
        t_ort = timed(lambda: seg.session.run(None, feed), repeat) / batch
        folder = os.path.join(tmp, "frames")
        os.makedirs(folder)
        for i in range(frames):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
        run_inference(seg, [folder], os.path.join(tmp, "warm"), outputs=("color",), batch=batch, progress=False)
        summary = run_inference(seg, [folder], os.path.join(tmp, "out"), outputs=("color",), batch=batch,
                                workers=2, progress=False)
    return {"eager_fps": 1 / t_eager, "ort_fps": 1 / t_ort, "end_to_end_fps": summary["frames_per_s"],
            "providers": seg.providers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    plans = [("deeplabv2_small", 24, 4), ("deeplabv2_lite0", 12, 2), ("deeplabv2_resnet101", 4, 1)]
    print(f"device: {args.device}, input 1024x512, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    results = {}
    for arch, frames, batch in plans:
        r = results[arch] = bench_model(arch, args.device, frames, args.repeat, batch)
        speed = r["ort_fps"] / r["eager_fps"]
        hidden = r["end_to_end_fps"] / r["ort_fps"]
        print(f"{arch:<20} eager {r['eager_fps']:7.2f} fps | onnxruntime {r['ort_fps']:7.2f} fps "
              f"({speed:.2f}x eager; target >= 1.2x: {'met' if speed >= 1.2 else 'NOT met'}) | sdca infer "
              f"end to end {r['end_to_end_fps']:7.2f} fps = {100 * hidden:.0f}% of the bare session "
              f"(target >= 85%: {'met' if hidden >= 0.85 else 'NOT met'}) [{', '.join(r['providers'])}]")
    ratio = results["deeplabv2_lite0"]["ort_fps"] / results["deeplabv2_resnet101"]["ort_fps"]
    print(f"Lite0 / ResNet-101, onnxruntime frames/s: {ratio:.1f}x (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
