"""The HTTP service end to end over loopback: answers against onnxruntime, every malformed request gets its 4xx,
and the process survives; a bounded load run with zero errors."""
import io
import json
import os
import struct
import zlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sdca.data.synthdrive import generate_frame
from sdca.deploy.onnx_export import export_onnx
from sdca.models import build_model, save_checkpoint
from sdca_serve.loadtest import load
from sdca_serve.runtime import OnnxSegmenter
from tests.common_utils import SIZE, Service, png


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
    # A 1 x 1 image is no error for a service with a serving size: resized like any frame, labels at 1 x 1.
    status, _, answer = service.segment(png(np.zeros((1, 1, 3), np.uint8)), content_type="image/png")
    assert status == 200 and np.asarray(Image.open(io.BytesIO(answer))).shape == (1, 1)
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
    from tests.common_utils import Service

    release, entered = threading.Event(), threading.Event()

    class Blocking:
        info = OnnxSegmenter(served_model).info
        providers = ["test"]

        def predict(self, frames, confidence=False):
            entered.set()
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
            assert entered.wait(30)  # the batcher has taken it: the model is blocked on it
            assert health()["queue"] == 0
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


def test_openapi_declares_the_segment_body_and_its_responses(service):
    import json

    status, _, body = service.request("GET", "/openapi.json")
    assert status == 200
    op = json.loads(body)["paths"]["/segment"]["post"]
    request = op["requestBody"]
    assert request["required"] is True
    assert {"image/png", "image/jpeg"} <= set(request["content"])
    assert all(c["schema"] == {"type": "string", "format": "binary"} for c in request["content"].values())
    assert {"200", "413", "415", "422", "503"} <= set(op["responses"])
    error = op["responses"]["415"]["content"]["application/json"]["schema"]
    assert error["required"] == ["error", "status"]


def test_schemathesis_finds_nothing_wrong_with_the_live_service(service, tmp_path):
    """The API fuzzer, run as its users run it, against the service on loopback: schema-valid requests (binary
    bodies of every declared content type, every output) with a bounded example count; zero failures."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("schemathesis is not installed (make setup installs the dev extras)")
    base = [exe, "run", f"http://127.0.0.1:{service.port}/openapi.json", "--max-examples", "25",
            "--generation-deterministic", "--workers", "1"]
    # Every check, positive_data_acceptance too, where the generated bodies are images: the coverage phase sends a
    # valid 1 x 1 PNG for the image/png body, which a service with a serving size resizes and segments like any
    # frame (it answered 422 before).
    run = subprocess.run([*base, "--checks", "all", "--phases", "examples,coverage"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # Fuzzing sends random bytes as the binary body, which no schema can declare undecodable: there every check but
    # positive_data_acceptance (the service must answer those with its declared 422, and does).
    run = subprocess.run([*base, "--checks", "all", "--exclude-checks", "positive_data_acceptance"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_a_model_without_a_known_size_serves_each_frame_at_its_own(tmp_path):
    """A model exported from a public release checkpoint records no training size: the service still starts,
    and runs every frame at its own size (frames of one size share batches)."""
    import json

    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8, bn="train").eval()
    assert model.info.train_size is None
    save_checkpoint(str(tmp_path / "m.pt"), model)
    export_onnx(str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), parity_shapes=((1, 32, 48),))
    svc = Service(str(tmp_path / "m.onnx"))
    try:
        _, _, meta = svc.request("GET", "/metadata")
        assert json.loads(meta)["input"]["size"] is None
        session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        from sdca_serve.metadata import session_metadata
        from sdca_serve.runtime import preprocess
        info = session_metadata(session)
        rng = np.random.default_rng(0)
        for h, w in ((40, 72), (57, 33)):
            frame = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            status, _, body = svc.segment(png(frame))
            assert status == 200
            labels = np.asarray(Image.open(io.BytesIO(body)))
            expected = session.run(None, {"image": preprocess(frame[None], info)})[0].argmax(1)[0]
            assert labels.shape == (h, w) and (labels == expected).mean() >= 0.999
        # Frames run at their own size here, so the minimum side still holds (and the schema says so).
        status, _, body = svc.segment(png(np.zeros((1, 1, 3), np.uint8)))
        assert status == 422 and "at least 16 pixels" in json.loads(body)["error"]
    finally:
        svc.stop()


def test_an_int8_model_is_served(served_model, tmp_path):
    """The service runs an INT8 (QDQ) export like any other: labels as ONNX Runtime gives them."""
    from sdca.deploy.quantize import quantize_int8

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(12):
        image, _ = generate_frame("real", "test", i, SIZE[1], SIZE[0])
        Image.fromarray(image).save(frames / f"{i:02d}.png")
    int8 = tmp_path / "m.int8.onnx"
    quantize_int8(served_model, str(int8), str(frames), calib_frames=8, held_out_frames=4, min_agreement=0.0,
                  progress=False)
    svc = Service(str(int8))
    try:
        frame = np.asarray(Image.open(frames / "00.png").convert("RGB"))
        status, _, body = svc.segment(png(frame))
        assert status == 200
        expected = OnnxSegmenter(str(int8)).predict(frame[None])[0][0]
        assert (np.asarray(Image.open(io.BytesIO(body))) == expected).mean() >= 0.999
    finally:
        svc.stop()
