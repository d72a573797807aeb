"""Single-process parts of the multi-process rules: the FADA order as long as a stage consumes, the warning when
processes x batch is not the global batch a preset's lr is for, and resuming at another world size refused."""
import os
import shutil

import pytest

from sdca.data.sampling import SUB_EPOCH, class_balanced_order
from sdca.engine import Runner, load_config
from sdca.engine.recipe import batch_mismatch, format_recipe
from sdca.models import read_checkpoint, save_checkpoint


def test_the_class_balanced_order_covers_iters_times_the_global_batch():
    sets = [{0, 1}, {1}, {2}, {0, 2}, {1, 2}]
    for iters, batch in ((1000, 8), (2500, 4), (10, 1)):
        order = class_balanced_order(sets, 3, iters, seed=0, batch=batch)
        assert len(order) >= iters * batch  # nothing repeats within the stage
        assert len(order) == (iters * batch // SUB_EPOCH + 1) * SUB_EPOCH  # whole sub-epochs, FADA's unit
    # The default batch of 1 keeps the order a single process drew before.
    assert class_balanced_order(sets, 3, 100, seed=4) == class_balanced_order(sets, 3, 100, seed=4, batch=1)


def test_the_runner_draws_the_order_for_the_whole_stage(tiny_data):
    tmp, config = tiny_data
    config = {**config, "data": {**config["data"], "batch_size": 2,
                                 "stages": {"source": {"sampling": "class_balanced"}}}}
    runner = Runner(load_config(None, [], **config), progress=False)
    source = runner._dataset("source", None, labelled_required=True)
    cfg = runner.cfg
    iters = 4000  # 4,000 x 2 picks: more than the 3,000 a single sub-epoch (the old length) holds
    solver = cfg.solver.source.__class__(iters=iters, lr=0.01)
    streams = runner._streams("source", {}, solver, source=source)
    assert len(streams["source"].loader.sampler.order) >= iters * 2


def test_preset_global_batch_warning_and_recipe():
    cfg = load_config("gta5_cityscapes_r101")
    assert batch_mismatch(cfg, "source", 4) is None and batch_mismatch(cfg, "adapt", 4) is None
    one = batch_mismatch(cfg, "source", 1)
    assert "1 process x batch 2 = global batch 2" in one and "global batch of 8" in one
    assert "data.stages.source.batch_size=8" in one
    two = batch_mismatch(cfg, "self_train", 2)
    assert "global batch 4" in two and "of 8" in two and "batch_size=4" in two
    table = format_recipe(cfg, 1)
    row = [line for line in table.splitlines() if line.startswith("global batch of the lr")][0]
    assert row.split()[-3:] == ["8", "4", "8"]
    assert batch_mismatch(load_config("default"), "source", 3) is None  # nothing set, nothing to warn about


def test_the_warning_is_printed_at_run_time(tiny_data, capsys):
    tmp, config = tiny_data
    config = {**config, "stages": ["source"],
              "solver": {**config["solver"], "source": {"iters": 1, "lr": 0.01, "global_batch": 8}}}
    Runner(load_config(None, [], **config), progress=True).train()
    out = capsys.readouterr().out
    assert "warning: stage source: 1 process x batch 2 = global batch 2" in out and "global batch of 8" in out


def test_resuming_at_another_world_size_is_refused(tiny_data):
    tmp, config = tiny_data
    config = {**config, "stages": ["source"]}
    Runner(load_config(None, [], **config), progress=False).train()
    folder = tmp / "runs" / "tiny" / "source"
    ckpt = read_checkpoint(str(folder / "last.pt"))
    assert ckpt["extra"]["world_size"] == 1
    os.remove(folder / "final.pt")
    os.remove(folder / "best.pt")
    ckpt["extra"]["world_size"] = 4  # as a 4-GPU run leaves it
    shutil.move(folder / "last.pt", folder / "one.pt")
    from sdca.models import load_model

    save_checkpoint(str(folder / "last.pt"), load_model(str(folder / "one.pt")), optimizer=ckpt["optimizer"],
                    step=ckpt["step"], extra=ckpt["extra"], statistics={})
    with pytest.raises(ValueError, match=r"written by 4 process\(es\) and this run has 1"):
        Runner(load_config(None, [], **config), progress=False).train()


def test_the_process_group_timeout_is_explicit(monkeypatch):
    """Rank-0-only work (pseudo-labels, FADA class sets) waits under SDCA_DIST_TIMEOUT_MIN, not PyTorch's 10."""
    import datetime

    from sdca.engine.distributed import DEFAULT_TIMEOUT_MIN, timeout

    monkeypatch.delenv("SDCA_DIST_TIMEOUT_MIN", raising=False)
    assert timeout() == datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN) and DEFAULT_TIMEOUT_MIN > 10
    monkeypatch.setenv("SDCA_DIST_TIMEOUT_MIN", "2.5")
    assert timeout() == datetime.timedelta(seconds=150)
    monkeypatch.setenv("SDCA_DIST_TIMEOUT_MIN", "soon")
    with pytest.raises(ValueError, match="SDCA_DIST_TIMEOUT_MIN"):
        timeout()


def test_class_sets_are_scanned_by_rank_0_only(tiny_data, monkeypatch):
    """Every other rank waits at the barrier and reads the JSON cache rank 0 wrote, instead of scanning every label
    file itself (8 minutes per rank for GTA5's 24,966 labels)."""
    import sdca.engine.runner as runner_module
    from sdca.data import sampling
    from sdca.engine.distributed import DistInfo

    tmp, config = tiny_data
    runner = Runner(load_config(None, [], **config), progress=False)
    source = runner._dataset("source", None, labelled_required=True)
    decoded, order = [], []
    real_decode = source.decode_label
    source.decode_label = lambda path: decoded.append(path) or real_decode(path)
    monkeypatch.setattr(runner_module, "barrier", lambda info: order.append(("barrier", len(decoded))))
    reads = []
    monkeypatch.setattr(runner_module, "class_sets", lambda *a, **k: reads.append(len(order)) or [])
    runner.dist = DistInfo(rank=1, world_size=2)  # a rank other than 0 looks only after the barrier
    runner._class_sets(source)
    assert order == [("barrier", 0)] and reads == [1]
    monkeypatch.setattr(runner_module, "class_sets", sampling.class_sets)
    runner.dist = DistInfo()  # rank 0 scans and writes the cache
    sets = runner._class_sets(source)
    assert len(decoded) == len(source.items)
    runner.dist = DistInfo(rank=1, world_size=2)
    decoded.clear()
    assert runner._class_sets(source) == sets and decoded == []  # rank 1: the cache, not the labels
