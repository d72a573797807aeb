"""The ROS 2 node end to end with the real middleware: the node in its own process, started from the parameter file
`sdca export` wrote, and a test node in this one that publishes sensor_msgs/Image and listens to the outputs.
Labels must equal `sdca infer`'s for the same frames (same runtime, batch 1); every encoding; headers carried
over; malformed messages skipped with a log line; newest frame wins under a burst; Ctrl-C shuts it down.

Without rclpy these tests skip, unless SDCA_REQUIRE_ROS=1 (as `make test` sets): then they fail."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image as PILImage

from sdca_serve.ros import MalformedImage, image_to_rgb

REQUIRE = os.environ.get("SDCA_REQUIRE_ROS") == "1"
try:
    import rclpy  # noqa: F401
    HAVE_ROS = True
except ImportError:
    if REQUIRE:
        raise
    HAVE_ROS = False
needs_ros = pytest.mark.skipif(not HAVE_ROS, reason="rclpy is not installed (make setup installs the ROS 2 wheels)")


# ------------------------------------------------------------------------------------- decoding, no ROS needed
def test_every_encoding_decodes_to_the_same_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    cases = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.concatenate([rgb, alpha], 2),
             "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], 2)}
    for encoding, pixels in cases.items():
        channels = pixels.shape[2]
        padded = np.zeros((5, 7 * channels + 3), np.uint8)  # rows padded to a longer step, as drivers do
        padded[:, :7 * channels] = pixels.reshape(5, -1)
        assert np.array_equal(image_to_rgb(encoding, 5, 7, 7 * channels + 3, padded.tobytes()), rgb), encoding
    gray = rgb[:, :, 0]
    assert np.array_equal(image_to_rgb("mono8", 5, 7, 7, gray.tobytes()), np.repeat(gray[:, :, None], 3, 2))
    for encoding, h, w, step, data, message in (("yuv422", 5, 7, 14, bytes(70), "encoding"),
                                                ("rgb8", 5, 7, 20, bytes(105), "step"),
                                                ("rgb8", 5, 7, 21, bytes(50), "bytes of data"),
                                                ("rgb8", 0, 0, 0, b"", "empty")):
        with pytest.raises(MalformedImage, match=message):
            image_to_rgb(encoding, h, w, step, data)


# ------------------------------------------------------------------------------------------ the live node
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model exported by the CLI, as a user would: model.onnx with its side files, model.ros2.yaml too."""
    from sdca.cli import main as cli
    from sdca.models import build_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("ros")
    torch.manual_seed(0)
    save_checkpoint(str(tmp / "m.pt"), build_model("deeplabv2_small", 19, width=8, train_size=(64, 32)).eval())
    result = CliRunner().invoke(cli, ["export", str(tmp / "m.pt"), "-o", str(tmp / "model.onnx"), "--no-check"])
    assert result.exit_code == 0, result.output
    assert (tmp / "model.ros2.yaml").is_file()
    return tmp


@pytest.fixture(scope="module")
def ros_env():
    """A DDS domain of our own, on loopback only, for both processes."""
    env = {"ROS_DOMAIN_ID": str(20 + os.getpid() % 150), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Node:
    """The node under test, in its own process."""

    def __init__(self, exported, env, *ros_params):
        self.log = open(exported / f"node-{time.time_ns()}.log", "w+")  # noqa: SIM115 -- the node writes to it until stop() closes it
        # -X faulthandler: a node that outlives its stop() is sent SIGABRT, which dumps every thread's stack
        # into the log the failure message shows.
        cmd = [sys.executable, "-X", "faulthandler", "-m", "sdca_serve.ros", "--ros-args", "--params-file", str(exported / "model.ros2.yaml")]
        for p in ros_params:
            cmd += ["-p", p]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})

    def text(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode


class Peer:
    """The test's own ROS node: publishes frames, collects the node's outputs by frame_id."""

    def __init__(self, reliable_outputs=False):
        import rclpy
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        rclpy.init()
        self.rclpy, self.Image = rclpy, Image
        self.node = rclpy.create_node(f"sdca_test_peer_{os.getpid()}")
        self.pub = self.node.create_publisher(Image, "image", QoSProfile(depth=100,
                                                                         reliability=ReliabilityPolicy.RELIABLE))
        outputs = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE if reliable_outputs
                             else ReliabilityPolicy.BEST_EFFORT)
        self.got = {"labels": {}, "color": {}}
        self.sent = 0
        for which in self.got:
            self.node.create_subscription(Image, f"segmentation/{which}",
                                          lambda m, w=which: self.got[w].__setitem__(m.header.frame_id, m),
                                          outputs)

    def spin(self, seconds):
        end = time.time() + seconds
        while time.time() < end:
            self.rclpy.spin_once(self.node, timeout_sec=0.02)

    def wait_for_node(self, node, timeout=60):
        end = time.time() + timeout
        while time.time() < end and (self.pub.get_subscription_count() == 0
                                     or self.node.count_publishers("segmentation/labels") == 0):
            assert node.proc.poll() is None, node.text()
            self.spin(0.1)
        assert self.pub.get_subscription_count() > 0, "the node never subscribed:\n" + node.text()
        # Matched is not yet delivered (the first best-effort samples can precede the reader's readiness): a round
        # trip, repeated until answered, before the test's own frames.
        frame = np.zeros((32, 64, 3), np.uint8)
        for attempt in range(int(timeout / 0.5)):
            self.send(f"warm-up-{attempt}", frame, "rgb8")
            labels, _ = self.answer(f"warm-up-{attempt}", timeout=0.5)
            if labels is not None:
                return
        raise AssertionError("the node never answered:\n" + node.text())

    def send(self, frame_id, array, encoding, stamp=(0, 0), step=None, height=None, width=None):
        m = self.Image()
        m.header.frame_id, m.header.stamp.sec, m.header.stamp.nanosec = frame_id, stamp[0], stamp[1]
        m.height = array.shape[0] if height is None else height
        m.width = array.shape[1] if width is None else width
        m.encoding = encoding
        m.step = (array.shape[1] * (array.shape[2] if array.ndim == 3 else 1)) if step is None else step
        m.data = np.ascontiguousarray(array).tobytes()
        self.pub.publish(m)
        self.sent += 1

    def answer(self, frame_id, timeout=20):
        end = time.time() + timeout
        while time.time() < end and not all(frame_id in g for g in self.got.values()):
            self.spin(0.05)
        return self.got["labels"].get(frame_id), self.got["color"].get(frame_id)

    def close(self):
        self.node.destroy_node()
        self.rclpy.shutdown()


def as_array(msg):
    channels = {"mono8": 1, "rgb8": 3}[msg.encoding]
    a = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, channels)
    return a[:, :, 0] if channels == 1 else a


def scene(seed, h=48, w=80):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    img[:horizon] = rng.uniform(120, 230, 3)
    img[horizon:] = rng.uniform(30, 120, 3)
    x = int(rng.integers(0, w // 2))
    img[horizon - 8:horizon + 6, x:x + w // 4] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def infer_labels(exported, frames, tmp):
    """`sdca infer` on the same frames, at the serving size the node uses, batch 1: its trainid PNGs."""
    from sdca.deploy.infer import run_inference
    from sdca_serve.runtime import OnnxSegmenter

    folder = tmp / "frames"
    folder.mkdir(exist_ok=True)
    for name, frame in frames.items():
        PILImage.fromarray(frame).save(folder / f"{name}.png")
    out = tmp / "infer"
    run_inference(OnnxSegmenter(str(exported / "model.onnx"), ["CPUExecutionProvider"]), [str(folder)], str(out),
                  outputs=["trainid"], batch=1, size=(64, 32), workers=1, progress=False)
    return {name: np.asarray(PILImage.open(next((out / "trainid").rglob(f"{name}.png")))) for name in frames}


@needs_ros
def test_the_node_segments_every_encoding_as_sdca_infer_does(exported, ros_env, tmp_path):
    node, peer = Node(exported, ros_env), Peer()
    try:
        peer.wait_for_node(node)
        frames = {f"f{i}": scene(i) for i in range(3)}
        frames["gray"] = np.repeat(scene(9)[:, :, :1], 3, axis=2)  # what mono8 frames are, as RGB
        expected = infer_labels(exported, frames, tmp_path)
        palette = None
        cases = []
        for name in ("f0", "f1", "f2"):
            rgb = frames[name]
            alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
            cases += [(name, "rgb8", rgb), (name, "bgr8", rgb[:, :, ::-1]),
                      (name, "rgba8", np.concatenate([rgb, alpha], 2)),
                      (name, "bgra8", np.concatenate([rgb[:, :, ::-1], alpha], 2))]
        cases.append(("gray", "mono8", frames["gray"][:, :, 0]))
        for i, (name, encoding, array) in enumerate(cases):
            frame_id = f"{name}-{encoding}-{i}"
            peer.send(frame_id, array, encoding, stamp=(1000 + i, 17 * i))
            labels, color = peer.answer(frame_id)
            assert labels is not None and color is not None, f"no answer to {frame_id}:\n" + node.text()
            assert (labels.header.stamp.sec, labels.header.stamp.nanosec) == (1000 + i, 17 * i)  # header carried
            assert color.header.frame_id == frame_id and labels.encoding == "mono8" and color.encoding == "rgb8"
            lab = as_array(labels)
            assert lab.shape == array.shape[:2]  # at the input's size
            assert np.array_equal(lab, expected[name]), frame_id  # exactly sdca infer's labels
            if palette is None:
                import onnx

                props = {p.key: p.value for p in onnx.load(str(exported / "model.onnx")).metadata_props}
                palette = np.zeros((256, 3), np.uint8)
                palette[:19] = np.asarray(json.loads(props["palette"]), np.uint8)
            assert np.array_equal(as_array(color), palette[lab]), frame_id
    finally:
        peer.close()
        assert node.stop() == 0, node.text()  # Ctrl-C: a clean exit
    assert "stopped:" in node.text()


@needs_ros
def test_malformed_messages_are_skipped_and_a_burst_keeps_the_newest(exported, ros_env):
    # qos reliable: with the default best-effort QoS a burst of 40 large frames overflows the transport's buffers
    # under load, and the middleware may lose the burst's last frame before the node could keep it (seen once in
    # CI). Reliable delivery with keep-last-1 still replaces waiting frames, so the node's own newest-wins slot is
    # what this exercises, and the newest frame is sure to arrive.
    node, peer = Node(exported, ros_env, "qos:=reliable"), Peer(reliable_outputs=True)
    try:
        peer.wait_for_node(node)
        good = scene(3)
        for n, (frame_id, kwargs) in enumerate((("bad-encoding", dict(encoding="yuv422")),
                                                ("bad-step", dict(encoding="rgb8", step=10)),
                                                ("bad-empty", dict(encoding="rgb8", height=0, width=0))), 1):
            # One at a time: sent together, the newest would replace the others before they were looked at.
            peer.send(frame_id, good if frame_id != "bad-empty" else np.zeros((0, 0, 3), np.uint8), **kwargs)
            end = time.time() + 20
            while time.time() < end and node.text().count("skipped a malformed image") < n:
                peer.spin(0.05)
        peer.send("after-bad", good, "rgb8")
        labels, _ = peer.answer("after-bad")
        assert labels is not None, node.text()  # still answering
        assert not any(k.startswith("bad-") for k in peer.got["labels"])
        log = node.text()
        assert log.count("skipped a malformed image") == 3 and "yuv422" in log, log

        big = np.ascontiguousarray(np.tile(scene(4), (6, 6, 1)))  # 480 x 288: each frame takes a while
        sent = [f"burst-{i:02d}" for i in range(40)]
        for frame_id in sent:
            peer.send(frame_id, big, "rgb8")
        labels, _ = peer.answer(sent[-1])
        assert labels is not None, node.text()  # the newest frame is answered
        peer.spin(1.0)
        answered = [f for f in sent if f in peer.got["labels"]]
        assert len(answered) < len(sent)  # frames that waited behind a newer one were dropped
        assert answered == sorted(answered)  # and what was answered came in order
    finally:
        peer.close()
        assert node.stop() == 0, node.text()
    stats = json.loads(node.text().split("stopped: ", 1)[1].splitlines()[0])
    assert stats["malformed"] == 3
    assert stats["processed"] + stats["dropped"] + stats["malformed"] == stats["received"]
    # What was not answered was dropped for a newer frame: by the node (counted) or already by the middleware's
    # keep-last-1 reader history (never received).
    assert stats["dropped"] > 0 or stats["received"] < peer.sent


def test_without_rclpy_the_node_says_how_to_get_it(monkeypatch):
    import builtins

    from sdca_serve import ros

    real = builtins.__import__

    def no_rclpy(name, *args, **kwargs):
        if name == "rclpy" or name.startswith("rclpy."):
            raise ImportError("no rclpy")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_rclpy)
    assert ros.main(["model.onnx"]) == 2
