"""DynamicBatcher on its own: batches form within the window, the queue bound refuses, errors reach callers."""
import asyncio
import threading

import numpy as np
import pytest

from sdca_serve.batcher import DynamicBatcher, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_requests_in_the_window_share_one_call_and_get_their_own_answer():
    sizes = []

    def model(frames):
        sizes.append(len(frames))
        return frames[:, 0, 0, 0] * 10

    async def main():
        batcher = DynamicBatcher(model, max_batch=4, max_wait_ms=200, queue_size=16)
        await batcher.start()
        frames = [np.full((2, 2, 3), i, np.int64) for i in range(10)]
        answers = await asyncio.gather(*(batcher.submit(f) for f in frames))
        await batcher.stop()
        return answers

    answers = run(main())
    assert [int(a) for a in answers] == [10 * i for i in range(10)]
    assert sum(sizes) == 10 and max(sizes) <= 4 and sizes[:2] == [4, 4]


def test_a_full_queue_refuses_at_once():
    release = threading.Event()

    def model(frames):
        release.wait(10)
        return frames[:, 0, 0, 0]

    async def main():
        batcher = DynamicBatcher(model, max_batch=1, max_wait_ms=0, queue_size=2)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 1, 3))))
        await asyncio.sleep(0.1)  # the loop has taken it and the model is busy with it
        waiting = [asyncio.ensure_future(batcher.submit(np.ones((1, 1, 3)))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await batcher.submit(np.ones((1, 1, 3)))
        refused = batcher.stats["refused"]
        release.set()
        done = await asyncio.gather(first, *waiting)
        await batcher.stop()
        return refused, done

    refused, done = run(main())
    assert refused == 1 and [float(d) for d in done] == [0.0, 1.0, 1.0]


def test_a_failing_model_call_fails_its_requests_not_the_batcher():
    calls = []

    def model(frames):
        calls.append(len(frames))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return frames[:, 0, 0, 0]

    async def main():
        batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=0, queue_size=8)
        await batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(np.zeros((1, 1, 3)))
        after = await batcher.submit(np.full((1, 1, 3), 5.0))
        running = batcher.running
        await batcher.stop()
        return after, running

    after, running = run(main())
    assert float(after) == 5.0 and running
