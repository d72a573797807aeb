"""The HTTP service end to end over loopback: answers against onnxruntime, every malformed request gets its 4xx,
and the process survives; a bounded load run with zero errors."""
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

from sdca.data.synthdrive import generate_frame
from sdca_serve.loadtest import load
from sdca_serve.runtime import OnnxSegmenter

from .conftest import SIZE, png


def frame(i=0, size=SIZE):
    return generate_frame("real", "test", i, size[1], size[0])[0]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data (what a decompression bomb starts with)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_health_and_metadata_describe_the_model(service, served_model):
    status, kind, body = service.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, kind, body = service.request("GET", "/metadata")
    meta = json.loads(body)
    info = OnnxSegmenter(served_model).info
    assert status == 200 and kind == "application/json"
    assert meta["classes"] == info.class_names and meta["palette"] == [list(c) for c in info.palette]
    assert meta["input"]["size"] == list(SIZE) and meta["input"]["mean"] == list(info.mean)


def test_segment_outputs_match_onnxruntime(service, served_model):
    segmenter = OnnxSegmenter(served_model)
    image = frame(3)
    expected = segmenter.predict(image[None])[0][0]  # the frame has the serving size: no resize on either side
    status, kind, body = service.segment(png(image))
    assert status == 200 and kind == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), expected)
    status, _, body = service.segment(png(image), output="color")
    palette = np.asarray(segmenter.info.palette, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), palette[expected])
    status, kind, body = service.segment(png(image), output="json")
    shares = json.loads(body)
    counts = np.bincount(expected.ravel(), minlength=19) / expected.size
    assert kind == "application/json" and (shares["width"], shares["height"]) == SIZE
    assert shares["shares"] == {segmenter.info.class_names[k]: round(float(counts[k]), 6) for k in np.flatnonzero(counts)}


def test_other_sizes_and_jpeg_come_back_at_their_own_size(service):
    image = frame(1, (200, 90))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    status, _, body = service.segment(buffer.getvalue(), content_type="image/jpeg")
    assert status == 200 and np.asarray(Image.open(io.BytesIO(body))).shape == (90, 200)


def test_malformed_requests_get_their_4xx_and_the_service_stays_up(service):
    valid = png(frame(2))
    truncated = valid[: len(valid) // 2]
    rng = np.random.default_rng(0)
    bad = [
        ("empty body", b"", "image/png", 422),
        ("wrong content type", valid, "application/json", 415),
        ("form encoding (curl -d)", valid, "application/x-www-form-urlencoded", 415),
        ("random bytes", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "application/octet-stream", 422),
        ("1x1 image", png(np.zeros((1, 1, 3), np.uint8)), "image/png", 422),
        ("20000x20000 header", png_header_only(20000, 20000), "image/png", 422),
        ("truncated PNG", truncated, "image/png", 422),
        ("over the upload limit", b"\0" * (1 << 20 | 1), "image/png", 413),
    ]
    for name, body, content_type, expected in bad:
        status, kind, answer = service.segment(body, content_type=content_type)
        assert status == expected, f"{name}: {status} {answer[:200]}"
        error = json.loads(answer)
        assert kind == "application/json" and error["status"] == expected and error["error"], name
        ok_status, _, _ = service.segment(valid)  # interleaved: valid requests still succeed
        assert ok_status == 200, f"after {name}"
    status, _, answer = service.segment(valid, output="nonsense")
    assert status == 422 and "output" in json.loads(answer)["error"]
    assert service.process.poll() is None
    assert json.loads(service.request("GET", "/health")[2])["status"] == "ok"


def test_a_thousand_requests_from_sixteen_clients_without_an_error(service):
    result = load(service.port, [png(frame(i)) for i in range(8)], total=1000, clients=16, time_limit=240)
    assert result["requests"] == 1000 and result["errors"] == 0, result
    assert result["statuses"] == {200: 1000}
    health = json.loads(service.request("GET", "/health")[2])
    assert health["frames"] >= 1000 and health["batches"] < health["frames"]  # requests were batched


def test_a_full_queue_answers_503_with_retry_after(served_model):
    """A model that blocks until released: one request in the model, one waiting (queue 1), the next is refused."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from sdca_serve.app import ServeSettings, create_app

    from sdca_serve.loadtest import free_port

    from .conftest import Service

    release = threading.Event()

    class Blocking:
        info = OnnxSegmenter(served_model).info
        providers = ["test"]

        def predict(self, frames, confidence=False):
            release.wait(30)
            return np.zeros(frames.shape[:3], np.uint8), None

    port = free_port()
    app = create_app(ServeSettings(model=served_model, size=SIZE, max_batch=1, max_wait_ms=0, queue_size=1),
                     segmenter=Blocking())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = Service.__new__(Service)  # reuse its request helpers against this in-process server
    client.port = port
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)

    def health():
        return json.loads(client.request("GET", "/health")[2])

    def wait_for(condition):
        end = time.time() + 20
        while not condition(health()) and time.time() < end:
            time.sleep(0.02)

    body = png(frame(0))
    try:
        with ThreadPoolExecutor(2) as pool:
            in_model = pool.submit(client.segment, body)
            wait_for(lambda h: h["queue"] == 0 and h["frames"] == 0)
            time.sleep(0.2)  # the batcher has taken it: the model is blocked on it
            queued = pool.submit(client.segment, body)
            wait_for(lambda h: h["queue"] == 1)
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/segment", body=body, headers={"Content-Type": "image/png"})
            refused = conn.getresponse()
            assert refused.status == 503 and refused.getheader("Retry-After") == "1"
            assert json.loads(refused.read())["status"] == 503
            conn.close()
            release.set()
            assert in_model.result(timeout=30)[0] == 200 and queued.result(timeout=30)[0] == 200
        assert health()["refused"] == 1
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=20)


def test_startup_errors_name_the_file(tmp_path):
    import subprocess
    import sys

    missing = subprocess.run([sys.executable, "-m", "sdca_serve", str(tmp_path / "nope.onnx")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "nope.onnx" in missing.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    junk = subprocess.run([sys.executable, "-m", "sdca_serve", str(tmp_path / "junk.onnx")], capture_output=True,
                          text=True, timeout=60)
    assert junk.returncode == 2 and "junk.onnx" in junk.stderr
