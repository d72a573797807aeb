"""python -m sdca_serve MODEL.onnx [--host 127.0.0.1] [--port 8080] ...  (also `sdca serve` and `sdca-serve`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _size(text: str):
    from .codec import parse_size

    try:
        width, height = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return width, height


def parser(prog: str = "python -m sdca_serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve an ONNX model exported by `sdca export --onnx` over "
                                "HTTP: GET /health, GET /metadata, POST /segment?output=labels|color|json (the "
                                "encoded image as the body).")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--size", type=_size, help="WIDTHxHEIGHT frames are resized to (default: the model's)")
    p.add_argument("--max-batch", type=int, default=8, help="frames per model call at most (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait; more get 503 (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest body accepted, in MiB (default 20)")
    p.add_argument("--max-side", type=int, default=8192, help="largest image side in pixels (default 8192)")
    p.add_argument("--providers", help="ONNX Runtime providers in priority order, e.g. cuda,cpu")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="onnxruntime (default) or openvino (OpenVINO's CPU plugin; pip install openvino)")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="--runtime openvino: inference precision (bf16 where the CPU reports it)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: Optional[List[str]] = None, prog: str = "python -m sdca_serve") -> int:
    args = parser(prog).parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"{prog}: {args.model}: no such model file (export one with `sdca export --onnx CKPT -o MODEL.onnx`)",
              file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("sdca serve needs FastAPI and uvicorn: pip install fastapi uvicorn (or pip install ./serve)",
              file=sys.stderr)
        return 2
    from .app import ServeSettings, create_app
    from .codec import Limits

    for name, value in (("--max-batch", args.max_batch), ("--queue", args.queue), ("--port", args.port)):
        if value < (0 if name == "--port" else 1):
            print(f"{prog}: {name} must be positive, got {value}", file=sys.stderr)
            return 2
    settings = ServeSettings(model=args.model, size=args.size, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, queue_size=args.queue,
                             limits=Limits(max_bytes=int(args.max_upload_mb * 2**20), max_side=args.max_side),
                             providers=args.providers.split(",") if args.providers else None, device=args.device,
                             threads=args.threads, runtime=args.runtime, precision=args.precision)
    try:
        app = create_app(settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # onnxruntime's own load errors (not a model, wrong file)
        print(f"{prog}: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    print(f"{prog}: serving {args.model} on http://{args.host}:{args.port} (POST /segment, GET /metadata, "
          "GET /health)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
