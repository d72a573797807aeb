"""A ROS 2 segmentation node over an exported model (ONNX Runtime; no torch).

    python -m sdca_serve.ros MODEL.onnx [--size WxH] [--ros-args --params-file MODEL.ros2.yaml ...]
    sdca ros MODEL.onnx ...

Subscribes to a ``sensor_msgs/Image`` topic (rgb8, bgr8, rgba8, bgra8, mono8; any size) and optionally a
``sensor_msgs/CompressedImage`` one; publishes, with the input's header (stamp, frame_id) and at its size, a
``mono8`` image of class ids (255: none) and an ``rgb8`` colour mask (the model's palette), optionally an
overlay and the per-class pixel shares (``std_msgs/String``, JSON); the colour mask, overlay and shares are
rendered only while something subscribes to them. The conventions of Isaac ROS and Autoware
segmentation nodes: sensor-data QoS (best effort, depth 1) by default, the palette and network size from the
model. Frames are resized to the serving size (the model's training size unless ``size`` is set) exactly as
``sdca infer --size`` does (OpenCV bilinear; labels back with nearest neighbour), so the labels equal
``sdca infer``'s for the same frames and runtime.

Inference runs on its own thread, off the executor: the newest frame wins, a frame that arrives while another
waits replaces it (counted as dropped). A malformed message (unknown encoding, a step or data too short, an
empty image) is logged and skipped. Ctrl-C (SIGINT) shuts the node down cleanly.

Parameters (``sdca export`` writes a ready ``NAME.ros2.yaml``; ``--ros-args -p name:=value`` overrides):
``model``, ``input_topic`` (``image``), ``compressed_topic`` (empty: off), ``labels_topic``
(``segmentation/labels``), ``color_topic`` (``segmentation/color``), ``overlay_topic`` and ``shares_topic``
(empty: off), ``overlay_opacity`` (0.5), ``qos`` (``sensor_data`` or ``reliable``), ``size`` (``WxH``; empty: the
model's), ``providers`` (comma-separated ONNX Runtime providers; empty: the best available), ``threads`` (0: ONNX
Runtime's default), ``runtime`` (``onnxruntime`` or ``openvino``) and ``precision`` (``f32``; ``bf16`` with
OpenVINO).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Optional, Tuple

import numpy as np

NODE_NAME = "sdca_segmentation"
ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
DEFAULTS = {
    "model": "", "input_topic": "image", "compressed_topic": "", "labels_topic": "segmentation/labels",
    "color_topic": "segmentation/color", "overlay_topic": "", "shares_topic": "", "overlay_opacity": 0.5,
    "qos": "sensor_data", "size": "", "providers": "", "threads": 0, "runtime": "onnxruntime", "precision": "f32",
}


class MalformedImage(ValueError):
    """A message that is not an image this node reads; logged and skipped."""


def image_to_rgb(encoding: str, height: int, width: int, step: int, data: bytes) -> np.ndarray:
    """A sensor_msgs/Image's fields -> uint8 RGB [H, W, 3] (rows padded to ``step`` bytes are cut)."""
    if encoding not in ENCODINGS:
        raise MalformedImage(f"encoding {encoding!r} is not read (one of {', '.join(ENCODINGS)})")
    channels = ENCODINGS[encoding]
    if height == 0 or width == 0:
        raise MalformedImage(f"the image is empty ({width}x{height})")
    if step < width * channels:
        raise MalformedImage(f"step {step} is shorter than a row ({width} x {channels} bytes)")
    if len(data) < step * (height - 1) + width * channels:
        raise MalformedImage(f"{len(data)} bytes of data for {height} rows of step {step}")
    rows = np.frombuffer(bytes(data), dtype=np.uint8, count=min(len(data), step * height))
    if rows.size < step * height:  # the last row may come without its padding
        rows = np.concatenate([rows, np.zeros(step * height - rows.size, np.uint8)])
    pixels = rows.reshape(height, step)[:, :width * channels].reshape(height, width, channels)
    if encoding == "mono8":
        return np.repeat(pixels, 3, axis=2)
    if encoding.startswith("bgr"):
        pixels = pixels[:, :, 2::-1]
    return np.ascontiguousarray(pixels[:, :, :3])


class Segmentation:
    """What the node does to a frame, without ROS: resize as ``sdca infer --size`` does, segment, resize back."""

    def __init__(self, model: str, size: Optional[Tuple[int, int]] = None, providers=None, threads: int = 0,
                 runtime: str = "onnxruntime", precision: str = "f32"):
        from .runtime import open_runtime

        self.segmenter = open_runtime(model, runtime, providers or None, "auto", threads, precision)
        info = self.segmenter.info
        self.size = size or info.input_size or info.train_size  # (width, height), None: each frame's own
        self.palette = np.zeros((256, 3), np.uint8)
        self.palette[:len(info.palette)] = np.asarray(info.palette, np.uint8)
        self.class_names = list(info.class_names)

    def labels(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        h, w = rgb.shape[:2]
        x = rgb if self.size is None or (w, h) == tuple(self.size) else \
            cv2.resize(rgb, (int(self.size[0]), int(self.size[1])), interpolation=cv2.INTER_LINEAR)
        labels = self.segmenter.predict(x[None])[0][0].astype(np.uint8)
        if labels.shape != (h, w):
            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
        return labels

    def color(self, labels: np.ndarray) -> np.ndarray:
        return self.palette[labels]

    def shares(self, labels: np.ndarray) -> dict:
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        return {self.class_names[k]: round(float(counts[k]) / labels.size, 6)
                for k in np.flatnonzero(counts[:len(self.class_names)])}


def parse_size(text: str) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    from .codec import parse_size as parse

    return parse(text)


def make_node(overrides: Optional[dict] = None):
    """The rclpy node (rclpy must be initialised). ``overrides``: parameter values given on our command line."""
    from rclpy.node import Node
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    class SegmentationNode(Node):
        def __init__(self):
            super().__init__(NODE_NAME)
            from rclpy.parameter import Parameter

            for name, default in DEFAULTS.items():
                self.declare_parameter(name, default)
            if overrides:  # our command line's options win over the parameter file
                self.set_parameters([Parameter(k, value=v) for k, v in overrides.items()])
            p = {name: self.get_parameter(name).value for name in DEFAULTS}
            if not p["model"]:
                raise ValueError("no model: pass MODEL.onnx or -p model:=PATH (or the export's NAME.ros2.yaml)")
            providers = [s.strip() for s in p["providers"].split(",") if s.strip()]
            self.seg = Segmentation(p["model"], parse_size(p["size"]), providers, int(p["threads"]), p["runtime"],
                                    p["precision"])
            self.opacity = float(p["overlay_opacity"])
            if p["qos"] in ("sensor_data", "reliable"):  # sensor data: best effort, the newest frame only
                qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                                 reliability=ReliabilityPolicy.BEST_EFFORT if p["qos"] == "sensor_data"
                                 else ReliabilityPolicy.RELIABLE)
            else:
                raise ValueError(f"qos must be sensor_data or reliable, got {p['qos']!r}")
            self.pub = {"labels": self.create_publisher(Image, p["labels_topic"], qos),
                        "color": self.create_publisher(Image, p["color_topic"], qos)}
            if p["overlay_topic"]:
                self.pub["overlay"] = self.create_publisher(Image, p["overlay_topic"], qos)
            if p["shares_topic"]:
                self.pub["shares"] = self.create_publisher(String, p["shares_topic"], qos)
            self.create_subscription(Image, p["input_topic"], self.on_image, qos)
            if p["compressed_topic"]:
                self.create_subscription(CompressedImage, p["compressed_topic"], self.on_compressed, qos)
            self.lock, self.wake = threading.Lock(), threading.Event()
            self.pending, self.stopping = None, False
            self.stats = {"received": 0, "processed": 0, "dropped": 0, "malformed": 0}
            self.worker = threading.Thread(target=self.run, name="sdca-inference", daemon=True)
            self.worker.start()
            size = f"{self.seg.size[0]}x{self.seg.size[1]}" if self.seg.size else "each frame's own"
            self.get_logger().info(f"{p['model']} on {', '.join(self.seg.segmenter.providers)}, serving size {size}: "
                                   f"{p['input_topic']} -> {p['labels_topic']}, {p['color_topic']}")

        # The executor's side: keep the newest frame only.
        def _offer(self, kind, msg):
            with self.lock:
                self.stats["received"] += 1
                if self.pending is not None:
                    self.stats["dropped"] += 1  # a newer frame replaces one that was still waiting
                self.pending = (kind, msg)
            self.wake.set()

        def on_image(self, msg):
            self._offer("raw", msg)

        def on_compressed(self, msg):
            self._offer("compressed", msg)

        # The inference thread's side.
        def run(self):
            while True:
                self.wake.wait()
                with self.lock:
                    item, self.pending = self.pending, None
                    self.wake.clear()
                    if self.stopping:
                        return
                if item is not None:
                    self.process(*item)

        def decode(self, kind, msg) -> np.ndarray:
            if kind == "raw":
                return image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)
            import cv2

            bgr = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise MalformedImage(f"compressed image ({msg.format!r}) could not be decoded")
            return np.ascontiguousarray(bgr[:, :, ::-1])

        def process(self, kind, msg):
            try:
                rgb = self.decode(kind, msg)
            except MalformedImage as exc:
                self.stats["malformed"] += 1
                self.get_logger().error(f"skipped a malformed image (frame_id {msg.header.frame_id!r}): {exc}")
                return
            labels = self.seg.labels(rgb)
            self.publish("labels", msg.header, labels, "mono8")
            # The derived outputs only for someone listening: rendering and sending a colour frame costs what
            # a good part of the inference does at camera sizes.
            if self.listened("color"):
                self.publish("color", msg.header, self.seg.color(labels), "rgb8")
            if self.listened("overlay"):
                blend = (1 - self.opacity) * rgb + self.opacity * self.seg.color(labels)
                self.publish("overlay", msg.header, np.clip(blend + 0.5, 0, 255).astype(np.uint8), "rgb8")
            if self.listened("shares"):
                self.pub["shares"].publish(String(data=json.dumps(
                    {"frame_id": msg.header.frame_id, "stamp": [msg.header.stamp.sec, msg.header.stamp.nanosec],
                     "shares": self.seg.shares(labels)})))
            self.stats["processed"] += 1

        def listened(self, which) -> bool:
            return which in self.pub and self.pub[which].get_subscription_count() > 0

        def publish(self, which, header, array, encoding):
            out = Image()
            out.header = header
            out.height, out.width = int(array.shape[0]), int(array.shape[1])
            out.encoding, out.is_bigendian = encoding, 0
            out.step = int(array.shape[1] * (array.shape[2] if array.ndim == 3 else 1))
            out.data = np.ascontiguousarray(array).tobytes()
            self.pub[which].publish(out)

        def close(self):
            with self.lock:
                self.stopping = True
            self.wake.set()
            self.worker.join(timeout=10)
            self.get_logger().info(f"stopped: {json.dumps(self.stats)}")

    return SegmentationNode()


def main(argv=None, prog: str = "python -m sdca_serve.ros") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    except ImportError:
        print(f"{prog}: rclpy is not importable: source a ROS 2 installation (Humble, Jazzy, Kilted) or install the "
              "wheels with pip install 'sdca[ros]'", file=sys.stderr)
        return 2
    ros_args = argv[argv.index("--ros-args"):] if "--ros-args" in argv else []
    ours = argv[:len(argv) - len(ros_args)]
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="the exported .onnx model (or the parameter file's 'model')")
    parser.add_argument("--size", help="serving size WxH (default: the model's training or fixed size)")
    parser.add_argument("--input-topic", help="sensor_msgs/Image topic (default: image)")
    parser.add_argument("--compressed-topic", help="sensor_msgs/CompressedImage topic (default: off)")
    parser.add_argument("--providers", help="ONNX Runtime providers, e.g. cuda,cpu")
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"], help="default: onnxruntime")
    parser.add_argument("--precision", choices=["f32", "bf16"], help="--runtime openvino: default f32")
    args = parser.parse_args(ours)
    overrides = {k: v for k, v in (("model", args.model), ("size", args.size), ("input_topic", args.input_topic),
                                   ("compressed_topic", args.compressed_topic), ("providers", args.providers),
                                   ("runtime", args.runtime), ("precision", args.precision))
                 if v}
    rclpy.init(args=[prog, *ros_args])
    node = executor = None
    try:
        node = make_node(overrides)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        # A bounded wait instead of rclpy.spin: the main thread comes back to Python at least every half
        # second, so a Ctrl-C or a shut-down context ends the node even when nothing wakes the wait set (CI
        # once saw the node outlive a 20 s grace period after SIGINT inside an unbounded spin).
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.5)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=1)
        if node is not None:
            node.close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
