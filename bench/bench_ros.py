"""The ROS 2 node end to end against `sdca infer` on the same model, runtime and frames, in one run.

    python bench/bench_ros.py --run runs/demo [--frames 60] [--threads 1]

The node (``python -m sdca_serve.ros``, its own process, started from the export's NAME.ros2.yaml with
``size`` set to the frames' size, so neither side resizes) gets 1024x512 ``rgb8`` frames one at a time: the
next is published when the previous one's labels arrive, so the figure is what the node sustains without
dropping (a strict round trip: publishing, transport and the two outputs are not overlapped with inference).
`sdca infer` (``run_inference``, batch 1, the same ONNX Runtime thread count) segments the same frames
from PNG files, reading and writing them, as a user runs it. Target: the node >= 90% of `sdca infer`'s
frames/s. Needs rclpy (``make setup`` installs the ROS 2 wheels).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a finished `sdca demo` run folder (its model.onnx)")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    parser.add_argument("--qos", choices=["reliable", "sensor_data"], default="reliable",
                        help="the node's QoS (default reliable: a 1.5 MB frame sent best effort over Fast DDS's "
                             "default transports can be lost whole when one fragment is)")
    args = parser.parse_args(argv)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(30 + os.getpid() % 150))
    import rclpy
    from PIL import Image
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image as ImageMsg

    from sdca.deploy.infer import run_inference
    from sdca.deploy.sidecar import write_sidecars
    from sdca_serve.runtime import OnnxSegmenter

    source = os.path.join(args.run, "model.onnx")
    if not os.path.isfile(source):
        raise SystemExit(f"{source} not found: run `sdca demo --out {args.run}` first")
    w, h = 1024, 512
    rng = np.random.default_rng(0)
    frames = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(args.frames)]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model.onnx")
        shutil.copyfile(source, model)
        write_sidecars(model)
        folder = os.path.join(tmp, "frames")
        os.makedirs(folder)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(folder, f"{i:04d}.png"), compress_level=1)

        seg = OnnxSegmenter(model, ["CPUExecutionProvider"], threads=args.threads)
        run_inference(seg, [os.path.join(folder, "0000.png")], os.path.join(tmp, "warm"), outputs=["trainid"],
                      batch=1, workers=2, progress=False)
        summary = run_inference(seg, [folder], os.path.join(tmp, "infer"), outputs=["trainid"], batch=1, workers=2,
                                progress=False)
        infer_fps = summary["frames_per_s"]

        node = subprocess.Popen([sys.executable, "-m", "sdca_serve.ros", "--ros-args", "--params-file",
                                 os.path.join(tmp, "model.ros2.yaml"), "-p", f"size:={w}x{h}",
                                 "-p", f"threads:={args.threads}", "-p", f"qos:={args.qos}"],
                                stdout=open(os.path.join(tmp, "node.log"), "w"), stderr=subprocess.STDOUT)  # noqa: SIM115 -- the node writes to it until it is stopped
        rclpy.init()
        peer = rclpy.create_node("sdca_bench_peer")
        pub = peer.create_publisher(ImageMsg, "image", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        answers = {}
        peer.create_subscription(ImageMsg, "segmentation/labels", lambda m: answers.__setitem__(m.header.frame_id, 1),
                                 QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if args.qos == "reliable"
                                            else ReliabilityPolicy.BEST_EFFORT))

        def send(frame_id, frame):
            m = ImageMsg()
            m.header.frame_id, m.height, m.width, m.encoding, m.step = frame_id, h, w, "rgb8", w * 3
            m.data = frame.tobytes()
            pub.publish(m)

        def answered(frame_id, timeout):
            end = time.time() + timeout
            while time.time() < end and frame_id not in answers:
                rclpy.spin_once(peer, timeout_sec=0.005)
            return frame_id in answers

        try:
            for attempt in range(120):  # discovery, then a first round trip
                send(f"warm-{attempt}", frames[0])
                if answered(f"warm-{attempt}", 1.0):
                    break
            else:
                raise SystemExit("the node never answered:\n" + Path(os.path.join(tmp, "node.log")).read_text())
            start = time.perf_counter()
            for i, frame in enumerate(frames):
                # One frame in flight: with the node's keep-last-1 subscription a second one sent before the first
                # is taken would replace it (newest frame wins), and the figure would count drops as speed.
                send(f"f{i}", frame)
                if not answered(f"f{i}", 30):
                    raise SystemExit(f"no answer to frame {i}")
            ros_fps = len(frames) / (time.perf_counter() - start)
        finally:
            peer.destroy_node()
            rclpy.shutdown()
            node.send_signal(2)
            node.wait(timeout=30)

    ratio = ros_fps / infer_fps
    print(f"ROS 2 node vs sdca infer, {args.frames} frames of {w}x{h}, ONNX Runtime CPU, {args.threads} thread(s):")
    print(f"  sdca infer (batch 1, PNG in and out): {infer_fps:.2f} frames/s")
    print(f"  ROS 2 node (rgb8 in, mono8 labels out; the colour mask has no subscriber, so it is not rendered; one "
          f"frame in flight, {args.qos} QoS): {ros_fps:.2f} frames/s")
    print(f"  node / infer = {ratio:.2f} (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
