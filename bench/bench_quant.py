"""INT8 against float32 in ONNX Runtime on this CPU, in one run: frames/s at 1024x512, and SynthDrive test mIoU.

    python bench/bench_quant.py --run runs/demo          # the demo's model (run `sdca demo` first)
    python bench/bench_quant.py --run runs/demo --r101   # also ResNet-101 (random weights: speed only)

The demo model is quantized as `sdca export --int8` does (calibration on 64 SynthDrive 'real' training frames,
the gate on 20 further ones) with this platform's default activations (uint8 on x86-64) and, for comparison,
the previous default (int8 activations, S8S8); every model is timed on the same 1024x512 input (batch 1, at 1
and 2 intra-op threads set explicitly, median of --repeat after two warm-ups) and scored on the labelled
SynthDrive test frames the demo evaluates on, at the model's training size. Targets: INT8 >= 1.5x the float32
frames/s at each thread count; mIoU drop <= 1.0 point. Also printed: the CPU's int8 instructions (VNNI, AMX),
read from /proc/cpuinfo at run time, and how many of the graph's convolutions ONNX Runtime runs as integer
kernels (after its graph optimisation).
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
from pathlib import Path

import numpy as np


def cpu_int8_features() -> list:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")})


def session(path, threads=0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def integer_convs(path) -> tuple:
    """(integer convolutions, all convolutions) in the graph ONNX Runtime actually runs."""
    from sdca.deploy.quantize import integer_kernels

    k = integer_kernels(path)
    return k["integer_convs"], k["convs"]


def frames_per_s(path, size, repeat, threads=0, runtime="onnxruntime", precision="f32") -> float:
    """Frames/s of one 1 x 3 x H x W input: ONNX Runtime's CPU provider, or OpenVINO's CPU plugin at
    ``precision`` (its inference-precision hint), ``threads`` intra-op threads (0: the runtime's default)."""
    x = np.random.default_rng(0).standard_normal((1, 3, size[1], size[0])).astype(np.float32)
    if runtime == "openvino":
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        request = ov.Core().compile_model(path, "CPU", config).create_infer_request()
        run = lambda: request.infer({0: x})  # noqa: E731
    else:
        s = session(path, threads)
        name = s.get_inputs()[0].name
        run = lambda: s.run(None, {name: x})  # noqa: E731
    for _ in range(2):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def openvino_precisions() -> list:
    """The OpenVINO precisions to time: f32, and bf16 where the CPU reports it; [] without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return []
    return ["f32"] + (["bf16"] if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else [])


def timed(models: dict, size, repeat) -> dict:
    """{name: (runtime, path, precision)} -> frames/s at 1 and 2 threads; every model at one thread count before
    the next, so that ratios within a thread count are side by side."""
    rows = {name: {} for name in models}
    for threads in (1, 2):
        for name, (runtime, path, precision) in models.items():
            rows[name][f"frames_per_s_{threads}t"] = frames_per_s(path, size, repeat, threads, runtime, precision)
    return rows


def runtime_models(float_path, int8_path) -> dict:
    """OpenVINO rows beside a model's ONNX Runtime ones: its precisions on the float export, and the INT8 one."""
    models = {f"openvino {p}": ("openvino", float_path, p) for p in openvino_precisions()}
    if models:
        models["openvino int8"] = ("openvino", int8_path, "f32")
    return models


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
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

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
    parser.add_argument("--lite0", action="store_true",
                        help="also time EfficientNet-Lite0 (ImageNet backbone, random head: speed only), with ReLU6 "
                             "as Clip and as relu(x) - relu(x - 6)")
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
        s8s8_path = os.path.join(tmp, "model.int8-s8s8.onnx")
        gate_s8s8 = quantize_int8(float_path, s8s8_path, calib, calib_frames=64, held_out_frames=20,
                                  min_agreement=0.0, activations="int8", progress=False)
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
        models = {"float32": ("onnxruntime", float_path, "f32"), "int8": ("onnxruntime", int8_path, "f32"),
                  "int8+Resize": ("onnxruntime", all_int8, "f32"), "int8-s8s8": ("onnxruntime", s8s8_path, "f32"),
                  **runtime_models(float_path, int8_path)}
        rows = timed(models, size, args.repeat)
        for name, (runtime, path, _) in models.items():
            if runtime == "onnxruntime":
                rows[name].update(miou=miou(path, frames, labels), integer_convs=integer_convs(path))
            rows[name]["frames_per_s"] = rows[name]["frames_per_s_1t"]
        old = rows.pop("int8-s8s8")  # the previous default, kept apart from the rows the report has always had
        others = {n: rows.pop(n) for n in list(rows) if n.startswith("openvino")}
        results["demo"] = {"gate": gate, "rows": rows, "test_frames": len(test), "openvino": others,
                           "old_s8s8": {"gate": gate_s8s8, **old}, "activations": gate["activations"]}
        import torch

        from sdca.deploy.onnx_export import export_onnx
        from sdca.models import build_model

        for key, wanted, arch, kwargs in (("r101", args.r101, "deeplabv2_resnet101", {}),
                                          ("lite0", args.lite0, "deeplabv2_lite0", {"pretrained": "imagenet"})):
            if not wanted:
                continue
            torch.manual_seed(0)  # ImageNet backbone (Lite0) or random weights (R101): speed only
            model = build_model(arch, 19, train_size=(1024, 512), bn="train" if key == "lite0" else "frozen",
                                **kwargs).eval()
            exports = {"float32": os.path.join(tmp, f"{key}.onnx")}
            export_onnx(model, exports["float32"], check=False)
            if key == "lite0":  # the export before Clip: ReLU6 as relu(x) - relu(x - 6)
                exports["float32 relu-difference"] = os.path.join(tmp, f"{key}.reludiff.onnx")
                export_onnx(model, exports["float32 relu-difference"], check=False, relu6="relu-difference")
            for name, act in (("int8", "auto"), ("int8-s8s8", "int8")):
                exports[name] = os.path.join(tmp, f"{key}.{name}.onnx")
                quantize_int8(exports["float32"], exports[name], calib, calib_frames=8, held_out_frames=2,
                              min_agreement=0.0, size=(512, 256), method="minmax", activations=act, progress=False)
            models = {n: ("onnxruntime", p, "f32") for n, p in exports.items()}
            models.update(runtime_models(exports["float32"], exports["int8"]))
            rows = timed(models, size, max(3, args.repeat // 3))
            for name, (runtime, path, _) in models.items():
                rows[name]["integer_convs"] = integer_convs(path) if runtime == "onnxruntime" else (None, None)
                rows[name]["frames_per_s"] = rows[name]["frames_per_s_1t"]
            results[key] = rows

    print(f"CPU int8/bf16 instructions (/proc/cpuinfo): {', '.join(results['cpu_int8_instructions']) or 'none found'}")
    demo = dict(results["demo"]["rows"], **{"int8-s8s8 (old)": results["demo"]["old_s8s8"]},
                **results["demo"]["openvino"])
    speed = demo["int8"]["frames_per_s"] / demo["float32"]["frames_per_s"]
    drop = 100 * (demo["float32"]["miou"] - demo["int8"]["miou"])
    print(f"int8 = this platform's default ({results['demo']['activations']} activations); int8-s8s8 = the previous "
          "default (int8 activations); openvino int8 = the same QDQ file as int8, read by OpenVINO")
    print(f"{'model':<6} {'runtime, precision':<24} {'fps 1 thread':>13} {'fps 2 threads':>14} {'test mIoU':>10} "
          f"{'integer convs':>14}")

    def row(model, name, r):
        q, n = r.get("integer_convs") or (None, None)
        convs = f"{q:>8} of {n:<4}" if q is not None else f"{'-':>8}"
        score = f"{100 * r['miou']:.1f}" if "miou" in r else "-"
        print(f"{model:<6} {name:<24} {r['frames_per_s_1t']:>13.2f} {r['frames_per_s_2t']:>14.2f} {score:>10} {convs}")

    for key, rows in (("demo", demo), ("r101", results.get("r101")), ("lite0", results.get("lite0"))):
        if not rows:
            continue
        for name, r in rows.items():
            row(key, name, r)
        base = "float32"
        for threads in (1, 2):
            t = f"frames_per_s_{threads}t"
            ratios = ", ".join(f"{n} {r[t] / rows[base][t]:.2f}x" for n, r in rows.items() if n != base)
            print(f"{key}, {threads} thread(s), against ONNX Runtime float32: {ratios}")
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
