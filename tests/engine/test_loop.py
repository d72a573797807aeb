"""The training loop's stop protocol: whenever a stop request lands, the step the loop stops at is saved."""
import os
import signal

import pytest

from sdca.engine.loop import Checkpointer, HookBase, SignalHandler, TrainLoop


class CountingStep:
    def __init__(self, on_step=None):
        self.on_step, self.ran = on_step, []

    def run_step(self, iteration):
        self.ran.append(iteration)
        if self.on_step:
            self.on_step(iteration)
        return {"loss": 1.0}


class RequestStopAfterHooks(HookBase):
    """Plays a signal that arrives after the checkpointer has looked at the step (the race CI hit)."""

    def __init__(self, at_iter):
        self.at_iter = at_iter

    def after_step(self):
        if self.trainer.iter == self.at_iter:
            self.trainer.stop_requested = "SIGINT"


def test_a_request_landing_after_the_checkpointer_is_saved_at_the_next_step():
    saved = []
    step = CountingStep()
    loop = TrainLoop(step, [Checkpointer(saved.append, period=1000), RequestStopAfterHooks(3)], max_iter=100)
    loop.train()
    # Stopping at step 3 would leave no checkpoint of it: the loop runs one more step and saves that.
    assert loop.stopped_by == "SIGINT"
    assert loop.iter == 4 and step.ran == [0, 1, 2, 3]
    assert saved == [4]


def test_a_request_during_the_step_stops_after_it_and_saves_it():
    saved = []

    def request(iteration):
        if iteration == 5:
            loop.stop_requested = "SIGTERM"

    loop = TrainLoop(CountingStep(request), [Checkpointer(saved.append, period=4)], max_iter=100)
    loop.train()
    assert loop.stopped_by == "SIGTERM" and loop.iter == 6
    assert saved == [4, 6]


def test_no_request_runs_to_the_end_and_saves_the_last_step():
    saved = []
    loop = TrainLoop(CountingStep(), [Checkpointer(saved.append, period=3)], max_iter=7, start_iter=2)
    loop.train()
    assert loop.stopped_by is None and loop.iter == 7
    assert saved == [3, 6, 7]


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs POSIX signals")
def test_a_real_sigint_stops_cleanly_and_a_second_one_aborts():
    saved = []
    before = signal.getsignal(signal.SIGINT)

    def interrupt(iteration):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    loop = TrainLoop(CountingStep(interrupt), [SignalHandler(), Checkpointer(saved.append, period=1000)],
                     max_iter=100)
    loop.train()
    assert loop.stopped_by == "SIGINT" and loop.iter == 3 and saved == [3]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back

    def interrupt_twice(iteration):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    loop = TrainLoop(CountingStep(interrupt_twice), [SignalHandler(), Checkpointer(saved.append, period=1000)],
                     max_iter=100)
    with pytest.raises(KeyboardInterrupt):
        loop.train()
    assert loop.failed and signal.getsignal(signal.SIGINT) is before
