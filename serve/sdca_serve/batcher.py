"""Dynamic batching: requests that arrive within a short window run as one model call.

One worker thread runs the model (ONNX Runtime parallelises inside a call; two calls at once would only fight
for the same cores), so the event loop stays free to accept, decode and answer. The queue is bounded: when it
is full a request is refused at once (the service answers 503) instead of waiting without limit.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np


class Overloaded(Exception):
    """The queue is full."""


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 8,
                 max_wait_ms: float = 5.0, queue_size: int = 64):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be at least 1 and max_wait_ms at least 0")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self.stats: Dict[str, float] = {"batches": 0, "frames": 0, "refused": 0, "failed_batches": 0,
                                        "model_seconds": 0.0}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdca-model")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        while self._queue is not None and not self._queue.empty():  # nobody will answer these any more
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(Overloaded("the service is shutting down"))

    async def submit(self, frame: np.ndarray) -> np.ndarray:
        """The model's output for one frame [H, W, 3]; frames of one size share a model call."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((frame, future))
        except asyncio.QueueFull:
            self.stats["refused"] += 1
            raise Overloaded(f"{self.queue_size} requests are already waiting") from None
        return await future

    async def _collect(self) -> List[Tuple[np.ndarray, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(f, fut) for f, fut in batch if not fut.done()]  # a client that went away needs no answer
            if not live:
                continue
            groups: Dict[tuple, list] = {}  # one model call per frame size (a service without a fixed size)
            for item in live:
                groups.setdefault(item[0].shape, []).append(item)
            for group in groups.values():
                await self._run(loop, group)

    async def _run(self, loop, live) -> None:
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.run_batch, np.stack([f for f, _ in live]))
        except Exception as exc:  # the model failed on this batch: every request in it gets the error
            self.stats["failed_batches"] += 1
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.stats["model_seconds"] += time.perf_counter() - start
        self.stats["batches"] += 1
        self.stats["frames"] += len(live)
        for (_, fut), result in zip(live, out):
            if not fut.done():
                fut.set_result(result)
