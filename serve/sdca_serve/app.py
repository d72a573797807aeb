"""The HTTP service: GET /health, GET /metadata, POST /segment (FastAPI over ONNX Runtime).

POST /segment takes the encoded image as the request body and answers, by ``?output=``, a label PNG (one
byte per pixel, the class index), a colour PNG (the class palette) or JSON class shares. Frames are resized to
the serving size (bilinear) so that any requests can share a batch; labels come back at the input size
(nearest). Errors are JSON ``{"error": ..., "status": ...}`` with 413, 415, 422 or 503.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time.
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional, Sequence, Tuple

import numpy as np

from .batcher import DynamicBatcher, Overloaded
from .codec import (
    IMAGE_TYPES,
    OUTPUTS,
    Limits,
    RequestError,
    check_content_type,
    decode_image,
    encode,
    resize_labels,
    resize_rgb,
)


@dataclass
class ServeSettings:
    model: str
    size: Optional[Tuple[int, int]] = None  # (width, height) frames are resized to; None: from the metadata
    max_batch: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 64
    limits: Limits = field(default_factory=Limits)
    providers: Optional[Sequence[str]] = None
    device: str = "auto"
    threads: int = 0
    runtime: str = "onnxruntime"  # onnxruntime | openvino
    precision: str = "f32"  # openvino: f32 | bf16


def serving_size(settings: ServeSettings, info) -> Optional[Tuple[int, int]]:
    """The size frames are resized to: --size, else the model's fixed or training size; None when none is known
    (each frame then runs at its own size, and only frames of one size share a batch)."""
    size = settings.size or info.input_size or info.train_size
    if size is None:
        return None
    if info.input_size and tuple(size) != tuple(info.input_size):
        raise ValueError(f"{settings.model} was exported for {info.input_size[0]}x{info.input_size[1]} inputs only; "
                         f"--size {size[0]}x{size[1]} cannot be served")
    return int(size[0]), int(size[1])


_ERROR_SCHEMA = {"type": "object", "required": ["error", "status"],
                 "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}
_ERROR = {"content": {"application/json": {"schema": _ERROR_SCHEMA}}}
# The body is the encoded image itself (not a form): declared here, since the handler reads the raw request,
# so that the OpenAPI document tells generated clients and fuzzers what to send.
SEGMENT_OPENAPI = {"requestBody": {
    "required": True, "description": "The encoded image (PNG, JPEG, BMP, WebP, TIFF or PPM) as the raw body, of any "
                                    "size when the service has a serving size (GET /metadata: input.size), else at "
                                    "least 16 pixels a side.",
    "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}}
SEGMENT_RESPONSES = {
    200: {"description": "labels: a PNG of class indices (one byte per pixel, 255 none); color: a PNG in the class "
                         "palette; json: class shares",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {
                          "type": "object", "required": ["width", "height", "shares"],
                          "properties": {"width": {"type": "integer"}, "height": {"type": "integer"},
                                         "shares": {"type": "object", "additionalProperties": {"type": "number"}}}}}}},
    413: {"description": "the body is over the size limit", **_ERROR},
    415: {"description": "the content type is not an image", **_ERROR},
    422: {"description": "the body is not a decodable image, or too small or large, or a bad query", **_ERROR},
    503: {"description": "the queue is full: retry after the Retry-After header's seconds", **_ERROR},
}


def create_app(settings: ServeSettings, segmenter=None):
    """The FastAPI application; ``segmenter`` (anything with ``predict`` and ``info``) defaults to the model file."""
    import contextlib

    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from . import __version__

    if segmenter is None:
        from .runtime import open_runtime

        segmenter = open_runtime(settings.model, settings.runtime, settings.providers, settings.device,
                                 settings.threads, settings.precision)
    info = segmenter.info
    size = serving_size(settings, info)
    # Every frame is resized to a known serving size, so any decodable image is served, a 1x1 one too; the
    # minimum side only guards a model that runs each frame at its own size (the network's stride needs room).
    limits = replace(settings.limits, min_side=1) if size is not None else settings.limits
    batcher = DynamicBatcher(lambda frames: segmenter.predict(frames)[0], max_batch=settings.max_batch,
                             max_wait_ms=settings.max_wait_ms, queue_size=settings.queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="sdca segmentation service", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # JSON like every other error; the process goes on
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error(422, f"invalid request: {where}")

    @app.get("/health")
    async def health():
        ok = batcher.running
        return JSONResponse({"status": "ok" if ok else "stopped", "queue": batcher.pending,
                             "queue_size": settings.queue_size, "batches": batcher.stats["batches"],
                             "frames": batcher.stats["frames"], "refused": batcher.stats["refused"]},
                            status_code=200 if ok else 503)

    @app.get("/metadata")
    async def metadata():
        return {"model": settings.model, "sdca_serve_version": __version__, "sdca_version": info.sdca_version,
                "arch": info.arch, "classes": list(info.class_names), "palette": [list(c) for c in info.palette],
                "input": {"size": list(size) if size else None,
                          "resize": ("bilinear to size; labels back to the input size (nearest)" if size else
                                     "none: each frame runs at its own size"),
                          "channel_order": info.channel_order, "mean": list(info.mean), "std": list(info.std),
                          "scale": info.scale, "formats": ["png", "jpeg", "bmp", "webp", "tiff", "ppm"]},
                "output": {"kinds": list(OUTPUTS), "model_output": info.output},
                "providers": list(getattr(segmenter, "providers", [])),
                "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                             "queue_size": settings.queue_size},
                "limits": asdict(settings.limits)}

    @app.post("/segment", summary="Segment one encoded image", openapi_extra=SEGMENT_OPENAPI,
              responses=SEGMENT_RESPONSES)
    async def segment(request: Request,
                      output: Literal["labels", "color", "json"] = Query("labels", description="labels | color | json")):
        if output not in OUTPUTS:
            raise RequestError(422, f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        check_content_type(request.headers.get("content-type"))
        body = await _read_body(request, settings.limits.max_bytes)
        frame = await run_in_threadpool(decode_image, body, limits)
        height, width = frame.shape[:2]
        resized = frame if size is None else await run_in_threadpool(resize_rgb, frame, size)
        try:
            labels = await batcher.submit(resized)
        except Overloaded as exc:
            return error(503, f"busy: {exc}; retry shortly", headers={"Retry-After": "1"})
        labels = np.asarray(labels, dtype=np.uint8)
        payload, media = await run_in_threadpool(
            lambda: encode(resize_labels(labels, width, height), output, info.class_names, info.palette))
        return Response(payload, media_type=media)

    return app


async def _read_body(request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be too large (Content-Length or bytes read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {max_bytes} bytes")
        except ValueError:
            raise RequestError(400, f"invalid Content-Length {declared!r}") from None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise RequestError(413, f"body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
