"""INT8 against float32 in ONNX Runtime on this CPU, in one run: frames/s at 1024x512, and SynthDrive test mIoU.

    python bench/bench_quant.py --run runs/demo          # the demo's model (run `sdca demo` first)
    python bench/bench_quant.py --run runs/demo --r101   # also ResNet-101 (random weights: speed only)

The demo model is quantized as `sdca export --int8` does (calibration on 64 SynthDrive 'real' training frames,
the gate on 20 further ones), then both models are timed on the same 1024x512 input (batch 1, all cores, median
of --repeat after two warm-ups) and scored on the labelled SynthDrive test frames the demo evaluates on, at the
model's training size. Targets: INT8 >= 1.5x the float32 frames/s; mIoU drop <= 1.0 point. Also printed: the
CPU's int8 instructions (VNNI, AMX) and how many of the graph's convolutions ONNX Runtime runs as integer
kernels (QLinearConv after its graph optimisation).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def cpu_int8_features() -> list:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")})


def session(path, optimized=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def integer_convs(path) -> tuple:
    """(QLinearConv nodes, all convolutions) in the graph ONNX Runtime actually runs."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(path, optimized)
        ops = [n.op_type for n in onnx.load(optimized).graph.node]
    return ops.count("QLinearConv"), sum(op in ("Conv", "QLinearConv", "FusedConv", "ConvInteger") for op in ops)


def frames_per_s(path, size, repeat) -> float:
    s = session(path)
    x = np.random.default_rng(0).standard_normal((1, 3, size[1], size[0])).astype(np.float32)
    name = s.get_inputs()[0].name
    for _ in range(2):
        s.run(None, {name: x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        s.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def miou(path, frames, labels, num_classes=19) -> float:
    from sdca_serve.metadata import session_metadata
    from sdca_serve.runtime import preprocess

    s = session(path)
    info = session_metadata(s)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for frame, label in zip(frames, labels):
        pred = s.run(None, {s.get_inputs()[0].name: preprocess(frame[None], info)})[0].argmax(1)[0]
        keep = label != 255
        cm += np.bincount(label[keep].astype(np.int64) * num_classes + pred[keep],
                          minlength=num_classes ** 2).reshape(num_classes, num_classes)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = cm.sum(1) > 0  # classes in the ground truth, as the evaluator counts them
    return float((inter[present] / np.maximum(union[present], 1)).mean())


def qdq_errors(float_path, int8_path, frames, tmp) -> dict:
    """ONNX Runtime's QDQ debugging tools: per activation, the signal-to-quantization-noise ratio (dB) between the
    float model and the INT8 one on the same frames ('xmodel_err'), and the error the tensor's own QDQ pair
    adds ('qdq_err')."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)
    from sdca_serve.metadata import session_metadata
    from sdca_serve.runtime import preprocess

    info = session_metadata(session(float_path))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(frames)

        def get_next(self):
            f = next(self.it, None)
            return None if f is None else {"image": preprocess(f[None], info)}

    f_aug, q_aug = os.path.join(tmp, "float.aug.onnx"), os.path.join(tmp, "int8.aug.onnx")
    modify_model_output_intermediate_tensors(float_path, f_aug)
    modify_model_output_intermediate_tensors(int8_path, q_aug)
    float_acts = collect_activations(f_aug, Reader(), execution_providers=["CPUExecutionProvider"])
    int8_acts = collect_activations(q_aug, Reader(), execution_providers=["CPUExecutionProvider"])
    errors = compute_activation_error(create_activation_matching(int8_acts, float_acts))
    return {name: {k: float(v) for k, v in e.items()} for name, e in errors.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a finished `sdca demo` run folder")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--r101", action="store_true", help="also time ResNet-101 (random weights, speed only)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from PIL import Image

    ort.set_default_logger_severity(3)  # the optimised-model dumps below warn about hardware-specific graphs

    from sdca.data.synthdrive import GENERATOR_VERSION
    from sdca.deploy.quantize import quantize_int8

    float_path = os.path.join(args.run, "model.onnx")
    if not os.path.isfile(float_path):
        raise SystemExit(f"{float_path} not found: run `sdca demo --out {args.run}` first")
    cache = os.path.join(os.path.dirname(os.path.abspath(args.run)), "synthdrive-cache", GENERATOR_VERSION)
    train = sorted(glob.glob(os.path.join(cache, "real_*", "train", "images", "*.png")))
    test = sorted(glob.glob(os.path.join(cache, "real_*", "test", "images", "*.png")))
    if not train or not test:
        raise SystemExit(f"no SynthDrive frames under {cache}: the demo's cache is needed")
    results = {"cpu_int8_instructions": cpu_int8_features()}
    size = (1024, 512)
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "calib")
        os.makedirs(calib)
        for path in train[:84]:  # 64 to calibrate on, 20 to judge: the defaults' proportions, smaller
            os.symlink(os.path.abspath(path), os.path.join(calib, os.path.basename(path)))
        int8_path = os.path.join(tmp, "model.int8.onnx")
        gate = quantize_int8(float_path, int8_path, calib, calib_frames=64, held_out_frames=20, min_agreement=0.0,
                             progress=False)
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in test]
        labels = [np.asarray(Image.open(p.replace(os.sep + "images" + os.sep, os.sep + "labels" + os.sep)))
                  for p in test]
        # The policy's alternative, measured: the final upsampling (Resize) quantized as well.
        all_int8 = os.path.join(tmp, "model.int8-resize.onnx")
        gate_all = quantize_int8(float_path, all_int8, calib, calib_frames=64, held_out_frames=20,
                                 min_agreement=0.0, keep_float=(), progress=False)
        results["resize_quantized_gate"] = gate_all
        errors = qdq_errors(float_path, int8_path, [np.asarray(Image.open(p).convert("RGB")) for p in test[:8]], tmp)
        results["qdq_sqnr_db"] = errors
        rows = {}
        for name, path in (("float32", float_path), ("int8", int8_path), ("int8+Resize", all_int8)):
            rows[name] = {"frames_per_s": frames_per_s(path, size, args.repeat), "miou": miou(path, frames, labels),
                          "integer_convs": integer_convs(path)}
        results["demo"] = {"gate": gate, "rows": rows, "test_frames": len(test)}
        if args.r101:
            import torch

            from sdca.deploy.onnx_export import export_onnx
            from sdca.models import build_model

            torch.manual_seed(0)
            model = build_model("deeplabv2_resnet101", 19, train_size=(1024, 512)).eval()
            r101 = os.path.join(tmp, "r101.onnx")
            export_onnx(model, r101, check=False)
            r101_int8 = os.path.join(tmp, "r101.int8.onnx")
            quantize_int8(r101, r101_int8, calib, calib_frames=8, held_out_frames=2, min_agreement=0.0,
                          size=(512, 256), method="minmax", progress=False)
            results["r101"] = {n: {"frames_per_s": frames_per_s(p, size, max(3, args.repeat // 3)),
                                   "integer_convs": integer_convs(p)}
                               for n, p in (("float32", r101), ("int8", r101_int8))}

    print(f"CPU int8 instructions: {', '.join(results['cpu_int8_instructions']) or 'none found'}")
    demo = results["demo"]["rows"]
    speed = demo["int8"]["frames_per_s"] / demo["float32"]["frames_per_s"]
    drop = 100 * (demo["float32"]["miou"] - demo["int8"]["miou"])
    print(f"{'model':<10} {'precision':<9} {'frames/s @1024x512':>19} {'test mIoU':>10} {'integer convs':>14}")
    for name, r in demo.items():
        q, n = r["integer_convs"]
        print(f"{'demo':<10} {name:<9} {r['frames_per_s']:>19.2f} {100 * r['miou']:>10.1f} {q:>8} of {n:<4}")
    if "r101" in results:
        for name, r in results["r101"].items():
            q, n = r["integer_convs"]
            print(f"{'r101':<10} {name:<9} {r['frames_per_s']:>19.2f} {'-':>10} {q:>8} of {n:<4}")
        r = results["r101"]
        print(f"r101: int8 / float32 = {r['int8']['frames_per_s'] / r['float32']['frames_per_s']:.2f}x")
    g, ga = results["demo"]["gate"], results["resize_quantized_gate"]
    ranked = sorted(((e.get("xmodel_err", float("inf")), n) for n, e in results["qdq_sqnr_db"].items()))
    print("QDQ debugging (SQNR of each activation, float vs int8, dB), lowest five: "
          + ", ".join(f"{n} {v:.1f}" for v, n in ranked[:5]) + f"; median {statistics.median(v for v, _ in ranked):.1f}")
    print(f"policy check: Resize kept float -> agreement {100 * g['label_agreement']:.2f}%; Resize quantized too -> "
          f"{100 * ga['label_agreement']:.2f}% (same calibration and held-out frames)")
    print(f"demo: int8 / float32 = {speed:.2f}x (target >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'}); mIoU drop "
          f"{drop:.2f} points on {results['demo']['test_frames']} test frames (target <= 1.0: "
          f"{'met' if drop <= 1.0 else 'NOT met'}); gate: label agreement {100 * g['label_agreement']:.2f}% on "
          f"{g['held_out_frames']} held-out frames")
    results["summary"] = {"demo_speedup": speed, "demo_miou_drop_points": drop}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
