"""The HTTP service under load, side by side in one run: dynamic batching on vs off (max batch 1).

    python bench/bench_serve.py                       # the demo model's architecture at 256x128, random weights
    python bench/bench_serve.py --model runs/demo/model.onnx

Each configuration: a fresh `python -m sdca_serve` process on loopback, then 1,000 POST /segment requests (PNG
frames of the serving size, label PNG back) from 16 concurrent keep-alive clients. Prints errors, p50/p99
latency, requests/s, the mean batch the service formed, and the throughput ratio batched / unbatched.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import urllib.request

from PIL import Image


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an exported .onnx (default: a fresh deeplabv2_small, width 16)")
    ap.add_argument("--size", default="256x128", help="serving size WxH (default 256x128, the demo's)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    from sdca.data.synthdrive import generate_frame
    from sdca_serve.loadtest import launch, load

    width, height = (int(v) for v in args.size.split("x"))
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    model = args.model
    if model is None:
        import torch

        from sdca.deploy.onnx_export import export_onnx
        from sdca.models import build_model

        torch.manual_seed(0)
        model = os.path.join(tmp, "m.onnx")
        export_onnx(build_model("deeplabv2_small", 19, width=16, bn="train").eval(), model, check=False)
    bodies = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.fromarray(generate_frame("real", "test", i, height, width)[0]).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    print(f"sdca_serve under load: {args.requests} requests, {args.clients} clients, {width}x{height} PNG frames, "
          f"{os.cpu_count()} cores")
    print(f"{'configuration':<34} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'mean batch':>10}")
    rates = {}
    for name, extra in (("dynamic batching (max 8, 5 ms)", ["--max-batch", "8", "--max-wait-ms", "5"]),
                        ("no batching (max batch 1)", ["--max-batch", "1", "--max-wait-ms", "0"])):
        proc, port = launch(model, "--size", f"{width}x{height}", "--queue", "256", *extra)
        try:
            result = load(port, bodies, total=args.requests, clients=args.clients)
            health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health"))
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        mean_batch = health["frames"] / max(1, health["batches"])
        rates[name] = result["requests_per_s"]
        print(f"{name:<34} {result['errors']:>6} {result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f} "
              f"{result['requests_per_s']:>8.1f} {mean_batch:>10.2f}")
    batched, single = rates.values()
    print(f"throughput ratio batched / unbatched: {batched / single:.2f}x")


if __name__ == "__main__":
    main()
