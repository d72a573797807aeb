"""`sdca infer`: segment files, folders, globs and videos, writing outputs that mirror the input tree.

Decoding (a thread pool, ahead of the model), inference (batches of frames of one size) and encoding (another
thread pool) overlap. Every output is written atomically, so ``skip_existing`` can resume an interrupted run;
unreadable inputs are reported and skipped; ``summary.json`` records frames, failures, time and throughput.
Needs numpy, Pillow, OpenCV and the segmenter's runtime; torch only for the PyTorch backend.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .._atomic import atomic_write, atomic_write_text
from ..data.frames import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Source, discover

# The frame sources live in sdca.data.frames (one extension list); the old names stay importable from here.
IMAGE_EXTS, VIDEO_EXTS = IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
OUTPUT_KINDS = ("color", "overlay", "trainid", "labelid", "confidence")
_EXT = {"color": ".png", "overlay": ".jpg", "trainid": ".png", "labelid": ".png", "confidence": ".png"}


def output_path(out_dir: str, kind: str, rel: str) -> str:
    return os.path.join(out_dir, kind, rel + _EXT[kind])


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Frame:
    rel: str
    source: str
    image: Optional[np.ndarray]  # uint8 RGB [H, W, 3]; None when it could not be read
    error: Optional[str] = None


def _read_image(src: Source) -> Frame:
    try:
        with Image.open(src.path) as im:
            im.load()
            return Frame(src.rel, src.path, np.array(im.convert("RGB")))
    except Exception as exc:  # any decoding failure is reported per file, never fatal
        return Frame(src.rel, src.path, None, f"{type(exc).__name__}: {exc}")


def _video_frames(src: Source, stride: int) -> Iterator[Frame]:
    import cv2

    cap = cv2.VideoCapture(src.path)
    if not cap.isOpened():
        yield Frame(src.rel, src.path, None, "cannot open video")
        return
    index = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if index % stride == 0:
                yield Frame(f"{src.rel}/{index:06d}", f"{src.path}#{index}", bgr[..., ::-1].copy())
            index += 1
    finally:
        cap.release()
    if index == 0:
        yield Frame(src.rel, src.path, None, "no decodable frame in video")


def _frames(sources: List[Source], workers: int, prefetch: int, stride: int, skip) -> Iterator[Frame]:
    """Frames in input order; images decoded by a pool ahead of the consumer (bounded by ``prefetch``)."""
    out: "queue.Queue" = queue.Queue(maxsize=max(2, prefetch))
    done = object()

    def produce():
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = []
            for src in sources:
                if src.video:
                    for f in pending:
                        out.put(f.result())
                    pending = []
                    for frame in _video_frames(src, stride):
                        out.put(frame)
                    continue
                if skip(src.rel):
                    out.put(Frame(src.rel, src.path, None, "skipped"))
                    continue
                pending.append(pool.submit(_read_image, src))
                if len(pending) >= prefetch:
                    out.put(pending.pop(0).result())
            for f in pending:
                out.put(f.result())
        out.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while True:
        item = out.get()
        if item is done:
            break
        yield item
    thread.join()


# ------------------------------------------------------------------------------------------------ writing
def _resize_nearest(labels: np.ndarray, hw) -> np.ndarray:
    import cv2

    return cv2.resize(labels, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def _save(path: str, array: np.ndarray, jpeg: bool = False) -> None:
    """PNG (lossless, fast compression level 1: encoding dominates the I/O of a bulk run) or JPEG, atomically."""
    import cv2

    bgr = array[..., ::-1] if array.ndim == 3 else array
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if jpeg else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, data = cv2.imencode(".jpg" if jpeg else ".png", np.ascontiguousarray(bgr), params)
    if not ok:
        raise ValueError(f"could not encode {path}")
    atomic_write(path, lambda f: f.write(data.tobytes()))


def write_outputs(out_dir: str, rel: str, frame: np.ndarray, labels: np.ndarray, conf: Optional[np.ndarray],
                  outputs: Sequence[str], palette: np.ndarray, opacity: float) -> None:
    from ..data.labels import trainid_to_labelid

    for kind in outputs:
        path = output_path(out_dir, kind, rel)
        if kind == "trainid":
            _save(path, labels)
        elif kind == "labelid":
            _save(path, trainid_to_labelid(labels))
        elif kind == "color":
            _save(path, palette[labels])
        elif kind == "overlay":
            colour = palette[labels].astype(np.float32)
            mask = (labels != 255)[..., None]
            blended = np.where(mask, frame * (1 - opacity) + colour * opacity, frame)
            _save(path, blended.clip(0, 255).astype(np.uint8), jpeg=True)
        elif kind == "confidence":
            _save(path, np.round(conf * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- the run
def run_inference(segmenter, inputs: Sequence[str], out_dir: str, *, outputs: Sequence[str] = ("color",),
                  batch: int = 4, size: Optional[Tuple[int, int]] = None, workers: int = 4,
                  skip_existing: bool = False, progress: bool = True, opacity: float = 0.5,
                  video_stride: int = 1) -> dict:
    """Segment every frame of ``inputs`` into ``out_dir``; returns (and writes) the summary."""
    from tqdm.auto import tqdm

    unknown = [k for k in outputs if k not in OUTPUT_KINDS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be some of {', '.join(OUTPUT_KINDS)}, got {list(outputs)}")
    info = segmenter.info
    if "labelid" in outputs and info.num_classes != 19:
        raise ValueError(f"labelid outputs are Cityscapes labelIds and need a 19-class model, not {info.num_classes}")
    sources = discover(inputs)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: info.num_classes] = np.asarray(info.palette, dtype=np.uint8)
    want_conf = "confidence" in outputs

    def exists(rel):
        return skip_existing and all(os.path.isfile(output_path(out_dir, k, rel)) for k in outputs)

    failures, frames_done, skipped = [], 0, 0
    start = time.time()
    writer = ThreadPoolExecutor(max(1, workers))
    in_flight = []
    bar = tqdm(total=None, unit="frame", desc="infer", disable=not progress, dynamic_ncols=True)

    def flush(group):
        nonlocal frames_done
        images = [f.image for f in group]
        if size is not None:
            import cv2

            model_in = np.stack([cv2.resize(im, (size[0], size[1]), interpolation=cv2.INTER_LINEAR) for im in images])
        else:
            model_in = np.stack(images)
        labels, conf = segmenter.predict(model_in, confidence=want_conf)
        for i, f in enumerate(group):
            lab, c = labels[i], (conf[i] if conf is not None else None)
            if lab.shape != f.image.shape[:2]:
                lab = _resize_nearest(lab, f.image.shape[:2])
                if c is not None:
                    import cv2

                    c = cv2.resize(c, (f.image.shape[1], f.image.shape[0]), interpolation=cv2.INTER_LINEAR)
            in_flight.append((f, writer.submit(write_outputs, out_dir, f.rel, f.image, lab, c, outputs, palette,
                                               opacity)))
        frames_done += len(group)
        bar.update(len(group))
        while len(in_flight) > 4 * max(1, workers) * batch:  # bound memory held by pending writes
            _collect(in_flight.pop(0), failures)

    group: List[Frame] = []
    try:
        for frame in _frames(sources, workers, prefetch=2 * batch * max(1, workers), stride=video_stride,
                             skip=exists):
            if frame.error == "skipped":
                skipped += 1
                bar.update(1)
                continue
            if frame.image is None:
                failures.append({"file": frame.source, "reason": frame.error})
                continue
            if skip_existing and exists(frame.rel):  # video frames are decoded in order; skip their work
                skipped += 1
                bar.update(1)
                continue
            shape = frame.image.shape if size is None else None
            if group and (len(group) >= batch or (shape is not None and group[0].image.shape != shape)):
                flush(group)
                group = []
            group.append(frame)
        if group:
            flush(group)
        for item in in_flight:
            _collect(item, failures)
    finally:
        writer.shutdown(wait=True)
        bar.close()
    wall = time.time() - start
    summary = {
        "frames": frames_done, "skipped_existing": skipped, "failures": failures, "wall_time_s": round(wall, 3),
        "frames_per_s": round(frames_done / wall, 3) if wall > 0 else None, "backend": segmenter.backend,
        "providers": list(segmenter.providers), "outputs": list(outputs), "size": list(size) if size else None,
        "classes": info.num_classes,
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _collect(item, failures):
    frame, future = item
    try:
        future.result()
    except Exception as exc:  # an output that could not be written is a failure of that frame
        failures.append({"file": frame.source, "reason": f"writing outputs failed: {type(exc).__name__}: {exc}"})
