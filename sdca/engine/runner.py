"""The pipeline: source -> init-stats -> adapt -> pseudo-label -> self-train, each stage resumable; or source ->
mean-teacher, the one-stage recipe of SDCA's successor (SePiCo), in place of the four after source.

Run folder (``runs/NAME/``): ``config.yaml`` (resolved), ``metrics.jsonl``, ``log.txt``, and one folder per
stage: ``last.pt`` (written atomically every checkpoint period and on SIGINT/SIGTERM), ``final.pt`` when the
stage is done (a later stage starts from it; a done stage is skipped), ``best.pt`` (best val mIoU), and for
pseudo-label the label maps and ``thresholds.json``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from typing import List, Optional

import numpy as np
import torch

from ..data import ImageFolder, ImagesAndLabelMaps, LabelSpace, build_transform, collate, finish_images, has_images
from ..data.sampling import class_balanced_order, class_pixel_counts, class_sets, rare_class_order
from ..device import resolve_device
from ..method import SemanticDistribution, downsample_labels
from ..models import load_model, read_checkpoint, save_checkpoint, set_batchnorm_mode
from ..models.checkpoint import model_from_checkpoint
from . import rng
from .builders import Stream, auto_workers, build_dataset, build_model_from_config, build_optimizer
from .config import Config, save_config, to_dict
from .distributed import (
    DistInfo,
    agree_stop,
    barrier,
    broadcast_module,
    broadcast_tensors,
    check_ranks_agree,
    init_distributed,
    module_tensors,
)
from .evaluator import evaluate, format_table, standard_subsets
from .loop import Checkpointer, HookBase, LRSchedule, MetricsLogger, SignalHandler, TrainLoop
from .pseudo_label import generate_pseudo_labels
from .recipe import batch_mismatch, stage_data, stage_transform
from .stages import STAGE_SEEDS
from .stages import stage as stage_record
from .steps import AdaptStep, SupervisedStep, pixel_rows, statistics_rows

log = logging.getLogger("sdca")


def statistics_tensors(statistics) -> list:
    """The tensors of a stage's semantic statistics ({name: SemanticDistribution}), as they are now."""
    return [t for s in (statistics or {}).values() for t in (s.count, s.mean, s.covariance)]


def stream_seed(seed: int, stage: str, index: int) -> int:
    """The sample-order seed of a stage's ``index``-th domain stream (source first): each stage and domain draws
    its own order, so adaptation does not replay the warm-up's sequence."""
    return seed + STAGE_SEEDS[stage] * 104_729 + index * 7919


class Interrupted(Exception):
    """A stage stopped on SIGINT/SIGTERM after saving its checkpoint; rerun the same command to resume."""

    def __init__(self, signal_name: str, checkpoint: str, step: Optional[int] = None):
        after = f" after step {step}" if step is not None else ""
        super().__init__(f"stopped by {signal_name}{after}; saved {checkpoint}. Run the same command again to "
                         "resume.")
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step


class EvalHook(HookBase):
    """Evaluates the val set every ``period`` steps (and at the end); keeps ``best.pt`` by mIoU."""

    def __init__(self, runner: "Runner", stage: str, model, period: int, save_best):
        self.runner, self.stage, self.model, self.period, self.save_best = runner, stage, model, period, save_best
        self.best = -1.0

    def _run(self):
        # Each rank's batch norm saw its own batches: evaluate (sharded) with rank 0's, the ones that are saved.
        broadcast_module(self.model, self.runner.dist, buffers_only=True)
        summary = self.runner.evaluate_val(self.model, self.stage, self.trainer.iter)
        if summary is not None and (summary["mIoU"] or 0.0) > self.best and self.runner.dist.is_main:
            self.best = summary["mIoU"]
            self.save_best(self.trainer.iter)
        self.model.train()

    def after_step(self):
        t = self.trainer
        if self.period > 0 and t.iter % self.period == 0 and not t.done:
            self._run()

    def after_train(self):
        t = self.trainer
        if t.done and not t.failed:
            self._run()


class Runner:
    def __init__(self, cfg: Config, *, progress: bool = True, init_checkpoint: Optional[str] = None,
                 trust_checkpoint: bool = False):
        """``trust_checkpoint``: read ``init_checkpoint`` and ``model.pretrained`` with full unpickling (files the
        user vouches for); the run's own checkpoints are always read as weights only."""
        self.cfg, self.progress, self.init_checkpoint = cfg, progress, init_checkpoint
        self.trust_checkpoint = trust_checkpoint
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())  # the one init_distributed set
        self.run_dir = cfg.run_dir
        if self.dist.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            handler = logging.FileHandler(os.path.join(self.run_dir, "log.txt"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl") if self.dist.is_main else None
        self._first_stage = cfg.stages[0] if cfg.stages else None
        cuda = self.device.type == "cuda"
        # The GPU's loader: uint8 frames (resized in uint8), photometric augmentation applied on the device, pinned
        # host memory; the CPU keeps the float pipeline its SynthDrive figures were measured with.
        self.uint8 = cfg.data.pipeline == "uint8" or (cfg.data.pipeline == "auto" and cuda)
        self.pin_memory = cuda
        if cuda and cfg.speed.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True  # every training stage feeds fixed shapes

    # ---------------------------------------------------------------------------------------- helpers
    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.run_dir, stage)

    def final_path(self, stage: str) -> str:
        if stage == "pseudo-label":
            return os.path.join(self.stage_dir(stage), "thresholds.json")
        return os.path.join(self.stage_dir(stage), "final.pt")

    def _record(self, record: dict) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _seed(self, offset: int = 0) -> None:
        seed = self.cfg.seed + 1000 * self.dist.rank + offset
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)

    def _input_checkpoint(self, stage: str) -> str:
        if self.init_checkpoint and stage == self._first_stage:
            return self.init_checkpoint
        (previous,) = stage_record(stage).starts_from
        path = self.final_path(previous)
        if self.cfg.solver.select == "best" and stage_record(previous).keeps_best:
            # The public script's choice: the best val mIoU (best.pt is final.pt when there is no val set).
            path = os.path.join(self.stage_dir(previous), "best.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"stage {stage} starts from {path}, which does not exist: run stage "
                                    f"{previous} first, or pass --init CHECKPOINT")
        return path

    def _trusted(self, path: str) -> bool:
        """Only the file the user passed with --init is read with the trust they gave; the run's own are not."""
        return self.trust_checkpoint and path == self.init_checkpoint

    def _load(self, path: str):
        return load_model(path, num_classes=self.cfg.model.num_classes, device=self.device,
                          trusted=self._trusted(path))

    def _build_model(self, train_size):
        return build_model_from_config(self.cfg.model, train_size=train_size,
                                       trusted=self.trust_checkpoint).to(self.device)

    def _workers(self, streams: int) -> int:
        if self.cfg.data.workers is not None:
            return self.cfg.data.workers
        return auto_workers(self.device.type, streams)

    def _dataset(self, which: str, transform, labelled_required: bool = False):
        ds_cfg = getattr(self.cfg.data, which)
        dataset = build_dataset(ds_cfg, self.cfg.model.num_classes, transform, self.cfg.data.on_corrupt,
                                progress=self.progress and self.dist.is_main)
        if labelled_required and isinstance(dataset, ImageFolder):
            raise ValueError(f"data.{which} must be labelled (kind {ds_cfg.kind!r} has no labels)")
        return dataset

    def evaluate_val(self, model, stage: str, step: int) -> Optional[dict]:
        if self.cfg.data.val is None:
            return None
        val = self._val_dataset()
        size = self.cfg.eval.size or self.cfg.data.target_size
        summary = evaluate(model, val, device=self.device, size=size, scales=self.cfg.eval.scales,
                           flip=self.cfg.eval.flip, subsets=self._subsets(), dist_info=self.dist,
                           progress=self.progress, resize=self.cfg.data.resize, batch_size=self.cfg.eval.batch_size,
                           workers=self._workers(1) if self.device.type == "cuda" else 0)
        if self.dist.is_main:
            log.info("%s step %d:\n%s", stage, step, format_table(summary))
            self._record({"stage": stage, "step": step, "eval": summary})
        return summary

    def _val_dataset(self):
        return build_dataset(self.cfg.data.val, self.cfg.model.num_classes, build_transform(),
                             self.cfg.data.on_corrupt, progress=self.progress and self.dist.is_main)

    def _subsets(self):
        return standard_subsets(self.cfg.model.num_classes)

    # ------------------------------------------------------------------------------------------- train
    def train(self, stages: Optional[List[str]] = None) -> dict:
        stages = list(stages or self.cfg.stages)
        self._first_stage = stages[0] if stages else None
        start = time.time()
        for stage in stages:
            if os.path.isfile(self.final_path(stage)):
                log.info("stage %s: done already (%s), skipped", stage, self.final_path(stage))
                if self.dist.is_main and self.progress:
                    print(f"sdca: stage {stage} already done ({self.final_path(stage)}), skipped", flush=True)
                continue
            # Seeded per stage, before any model is built, so that a stage's result depends on the config only.
            self._seed(STAGE_SEEDS[stage])
            getattr(self, stage_record(stage).runs)()
            barrier(self.dist)
        result = {"run_dir": self.run_dir, "stages": stages, "seconds": round(time.time() - start, 1)}
        if self.dist.is_main:
            self._record({"summary": result})
        return result

    def _train_stage(self, stage: str, model, solver, make_step, statistics=None, modules=None,
                     trained=()) -> None:
        """Shared by every training stage: optimizer, resume, hooks, loop, final checkpoint.

        ``modules``: {name: module} the stage keeps beside the model (a teacher, a projection head), saved in the
        checkpoint's ``extra["modules"]``, restored on resume and held identical on every rank; those named in
        ``trained`` are optimised with the head's learning rate."""
        cfg = self.cfg
        folder = self.stage_dir(stage)
        last = os.path.join(folder, "last.pt")
        modules = dict(modules or {})
        extra_params = [p for name in trained for p in modules[name].parameters()]
        optimizer = build_optimizer(model, cfg.solver, solver, extra_head=extra_params)
        start, consumed, step_state = 0, {}, {}
        if os.path.isfile(last):
            ckpt = read_checkpoint(last)
            saved_world = ckpt["extra"].get("world_size")
            if saved_world is not None and saved_world != self.dist.world_size:
                raise ValueError(
                    f"{last} was written by {saved_world} process(es) and this run has {self.dist.world_size}: each "
                    "process draws every world-size-th sample, so the resumed stage would not continue the same "
                    f"sample sequence. Resume with {saved_world} process(es), or delete {last} to restart the stage")
            model.load_state_dict(ckpt["model"]["state_dict"])
            for name, module in modules.items():
                module.load_state_dict(ckpt["extra"]["modules"][name])
            optimizer.load_state_dict(ckpt["optimizer"])
            start = int(ckpt["step"])
            consumed = ckpt["extra"].get("consumed", {})
            step_state = ckpt["extra"].get("step_state", {})
            if statistics is not None:
                for key, dist_ in statistics.items():
                    dist_.load_state_dict(ckpt["statistics"][key])
            rng.restore(ckpt["extra"]["rng"])
            log.info("stage %s: resuming from %s at step %d", stage, last, start)
        # One model on every rank: a freshly initialised head (or any state a rank built alone) is rank 0's.
        broadcast_module(model, self.dist)
        for module in modules.values():
            broadcast_module(module, self.dist)
        broadcast_tensors(statistics_tensors(statistics), self.dist)

        def held():  # everything that must be one copy on every rank
            return (module_tensors(model) + [t for m in modules.values() for t in module_tensors(m)]
                    + statistics_tensors(statistics))
        check_ranks_agree(held(), self.dist, f"the {stage} stage's starting model")
        warning = batch_mismatch(cfg, stage_record(stage).key, self.dist.world_size)
        if warning and self.dist.is_main:
            log.warning(warning)
            print(f"sdca: warning: {warning}", flush=True)
        if cfg.speed.channels_last:  # before the step exists: its gradient buckets view the converted weights
            model.to(memory_format=torch.channels_last)
            for module in modules.values():
                module.to(memory_format=torch.channels_last)
        step = make_step(optimizer, consumed)
        step.load_state_dict(step_state)
        step.channels_last = cfg.speed.channels_last

        def save(path, iteration):
            save_checkpoint(path, model, config=to_dict(cfg),
                            statistics={k: v.state_dict() for k, v in (statistics or {}).items()},
                            optimizer=optimizer.state_dict(), step=iteration,
                            extra={"stage": stage, "consumed": step.consumed(), "rng": rng.capture(),
                                   "step_state": step.state_dict(), "world_size": self.dist.world_size,
                                   "modules": {k: m.state_dict() for k, m in modules.items()}})

        main = self.dist.is_main
        power = cfg.solver.power if solver.power is None else solver.power
        hooks = [LRSchedule(optimizer, solver.lr, solver.schedule_iters or solver.iters, power, solver.warmup_iters,
                            solver.warmup_ratio),
                 SignalHandler(),
                 Checkpointer(lambda it: save(last, it), cfg.solver.checkpoint_period, enabled=main),
                 MetricsLogger(self.metrics_path, stage, cfg.solver.log_period, enabled=main,
                               tensorboard_dir=os.path.join(self.run_dir, "tensorboard"), progress=self.progress),
                 EvalHook(self, stage, model, cfg.solver.eval_period,
                          lambda it: save(os.path.join(folder, "best.pt"), it))]
        model.train()
        agree = (lambda requested: agree_stop(requested, self.dist)) if self.dist.enabled else None
        loop = TrainLoop(step, hooks, solver.iters, start, agree_stop=agree)
        loop.train()
        # Rank 0's batch norm statistics are the ones saved; the ranks must hold one model at the end too.
        broadcast_module(model, self.dist, buffers_only=True)
        for module in modules.values():
            broadcast_module(module, self.dist, buffers_only=True)
        # Read again: a pooled update replaces the statistics' tensors, so the start's list would be stale.
        check_ranks_agree(held(), self.dist, f"the {stage} stage's model at step {loop.iter}")
        if loop.stopped_by:
            barrier(self.dist)  # no rank leaves (torchrun would then end rank 0) before last.pt is written
            raise Interrupted(loop.stopped_by, last, loop.iter)
        if main:
            save(os.path.join(folder, "final.pt"), loop.iter)
            if cfg.data.val is None:  # no val set: the final weights are the best we know
                shutil.copyfile(os.path.join(folder, "final.pt"), os.path.join(folder, "best.pt"))
        losses = {k: float(v) for k, v in loop.losses.items()}
        summary = {"stage": stage, "done": True, "steps": loop.iter, "losses": losses}
        self._record(summary)
        self._report_data(stage, step.unreadable, step.mismatched)
        log.info("stage %s: done after %d steps, last losses %s", stage, loop.iter, losses)

    def _streams(self, stage: str, consumed: dict, solver, **datasets) -> dict:
        """One Stream per domain, with the stage's batch sizes and sampling. Each stage and domain draws its own
        sample order: adaptation must not replay the warm-up's sequence."""
        recipe = stage_data(self.cfg, stage_record(stage).key)
        streams = {}
        for i, (name, ds) in enumerate(datasets.items()):
            seed = stream_seed(self.cfg.seed, stage, i)
            batch = recipe.target_batch_size if name == "target" else recipe.batch_size
            order = None
            if name == "source" and recipe.sampling == "class_balanced":
                # FADA's rule, as many picks as the stage consumes: iters x the global batch.
                order = class_balanced_order(self._class_sets(ds), self.cfg.model.num_classes, solver.iters,
                                             seed=seed, batch=batch * self.dist.world_size)
            elif name == "source" and recipe.sampling == "rare_class":
                order = rare_class_order(self._class_sets(ds, counts=True), solver.iters, seed=seed,
                                         batch=batch * self.dist.world_size,
                                         temperature=recipe.rare_class_temperature,
                                         min_pixels=recipe.rare_class_min_pixels)
            streams[name] = Stream(ds, batch, self._workers(len(datasets)), seed, self.dist.rank,
                                   self.dist.world_size, consumed.get(name, 0), order=order,
                                   pin_memory=self.pin_memory)
        return streams

    def _class_sets(self, dataset, counts: bool = False):
        """Read once, by rank 0 (it writes the JSON cache, see class_sets); the others read that cache after a
        barrier instead of each scanning every label file. ``counts``: per-class pixel counts instead of sets."""
        scan = class_pixel_counts if counts else class_sets

        def read():
            return scan(dataset, self.cfg.model.num_classes, cache_dir=self.run_dir,
                        progress=self.progress and self.dist.is_main)
        sets = read() if self.dist.is_main else None
        barrier(self.dist)
        return sets if sets is not None else read()

    # ------------------------------------------------------------------------------------------ stages
    def run_source(self) -> None:
        cfg = self.cfg
        if self.init_checkpoint and self._first_stage == "source":
            model = self._load(self.init_checkpoint)
        else:
            model = self._build_model(cfg.data.source_size)
        source = self._dataset("source", stage_transform(cfg, "source", uint8=self.uint8), labelled_required=True)

        def make_step(optimizer, consumed):
            streams = self._streams("source", consumed, cfg.solver.source, source=source)
            step = SupervisedStep(model, optimizer, streams["source"], self.device, cfg.amp, self.dist,
                                  cfg.method.lambda_lov)
            step.consumed = lambda: {"source": streams["source"].consumed}
            return step
        self._train_stage("source", model, cfg.solver.source, make_step)

    @torch.no_grad()
    def run_init_stats(self) -> None:
        """Algorithm 1, line 2: the semantic distributions of features and outputs over the whole source set."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        model = self._load(self._input_checkpoint("init-stats"))
        source = self._dataset("source", build_transform(size=cfg.data.source_size, resize=cfg.data.resize,
                                                         uint8=self.uint8), labelled_required=True)
        stats = self._new_statistics(model)
        indices = list(range(self.dist.rank, len(source), self.dist.world_size))
        # No gradients here: data.batch_size or eval.batch_size frames per forward, whichever is larger (the paper
        # presets leave data.batch_size at 1 and batch evaluation by 4); the statistics accumulate in float64.
        batch = max(cfg.data.batch_size, cfg.eval.batch_size)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(source, indices), batch_size=batch,
                                             num_workers=self._workers(1), collate_fn=collate,
                                             pin_memory=self.pin_memory)
        normalize = model.info.normalization
        unreadable, mismatched = set(), set()
        for batch in tqdm(loader, desc="init-stats", disable=not (self.progress and self.dist.is_main)):
            unreadable.update(batch["skipped"])
            mismatched.update(batch["mismatched"])
            if not has_images(batch):
                continue
            out = model(normalize(finish_images(batch["image"].to(self.device, non_blocking=True))))
            labels = downsample_labels(batch["label"].to(self.device), out.features.shape[-2:]).reshape(-1)
            stats["features"].update(self._stat_rows(out.features), labels)
            stats["outputs"].update(self._stat_rows(out.logits), labels)
        # Each rank saw its own shard (their sizes may differ by one image, so no per-batch collective):
        # one exact pooled merge at the end gives every rank the statistics of the whole set.
        for s in stats.values():
            s.all_reduce()
        check_ranks_agree(statistics_tensors(stats), self.dist, "the init-stats statistics")
        if self.dist.is_main:
            save_checkpoint(self.final_path("init-stats"), model, config=to_dict(cfg),
                            statistics={k: v.state_dict() for k, v in stats.items()}, step=0,
                            extra={"stage": "init-stats"})
        self._record({"stage": "init-stats", "done": True, "pixels": int(stats["features"].count.sum())})
        self._report_data("init-stats", unreadable, mismatched)

    def _stat_rows(self, maps: torch.Tensor) -> torch.Tensor:
        return statistics_rows(pixel_rows(maps), self.cfg.method.variant)

    def _new_statistics(self, model) -> dict:
        m = self.cfg.method
        k = model.num_classes
        return {"features": SemanticDistribution(k, model.feature_dim, m.covariance, device=self.device),
                "outputs": SemanticDistribution(k, k, m.covariance, device=self.device)}

    def run_adapt(self) -> None:
        cfg = self.cfg
        path = self._input_checkpoint("adapt")
        ckpt = read_checkpoint(path, trusted=self._trusted(path))  # read once: weights and statistics
        model = model_from_checkpoint(ckpt, path, num_classes=cfg.model.num_classes).to(self.device)
        set_batchnorm_mode(model, "frozen" if cfg.method.adaptation_bn == "frozen" else "train")
        stats = self._new_statistics(model)
        init = (ckpt.get("statistics") if isinstance(ckpt, dict) else None) or {}
        if "features" not in init:
            raise ValueError(f"{path} holds no semantic statistics: run stage init-stats first")
        for key in stats:
            stats[key].load_state_dict(init[key])
        source = self._dataset("source", stage_transform(cfg, "adapt", uint8=self.uint8), labelled_required=True)
        target = self._dataset("target", stage_transform(cfg, "adapt", "target", uint8=self.uint8))

        def make_step(optimizer, consumed):
            streams = self._streams("adapt", consumed, cfg.solver.adapt, source=source, target=target)
            step = AdaptStep(model, optimizer, streams["source"], streams["target"], stats["features"],
                             stats["outputs"] if cfg.method.multi_level else None, cfg.method, self.device,
                             cfg.amp, self.dist, diagnostics_period=cfg.solver.log_period)
            step.consumed = lambda: {k: s.consumed for k, s in streams.items()}
            return step
        self._train_stage("adapt", model, cfg.solver.adapt, make_step, statistics=stats)

    def _report_data(self, stage: str, unreadable, mismatched=()) -> None:
        """One metrics.jsonl line per stage: the frames it skipped as unreadable and the image/label pairs of
        different sizes it trained on after resizing the label (both listed once, by name)."""
        for what, names in (("unreadable frame(s) skipped", unreadable),
                            ("image/label pair(s) of different sizes, label resized", mismatched)):
            if names and self.dist.is_main:
                log.warning("stage %s: %d %s: %s", stage, len(names), what, ", ".join(sorted(names)[:10]))
                if self.progress:
                    print(f"sdca: {stage}: {len(names)} {what}, e.g. {sorted(names)[0]}", flush=True)
        self._record({"stage": stage, "unreadable_frames": sorted(unreadable), "mismatched_pairs": sorted(mismatched)})

    def run_adapt_bn(self) -> None:
        """AdaBN after the last training stage: the newest of self-train, adapt and source (or --init), with its
        batch-norm statistics re-estimated on data.target (see :mod:`sdca.engine.adapt_bn`)."""
        from .adapt_bn import adapt_batchnorm

        if self.init_checkpoint and self._first_stage == "adapt-bn":
            start = self.init_checkpoint
        else:
            done = [self.final_path(s) for s in stage_record("adapt-bn").starts_from
                    if os.path.isfile(self.final_path(s))]
            if not done:
                raise FileNotFoundError("stage adapt-bn re-estimates a trained model's batch norm: run a training "
                                        "stage first, or pass --init CHECKPOINT")
            start = done[0]
        target = self._dataset("target", build_transform(size=self.cfg.data.target_size))
        frames = [os.path.join(target.image_root, name) for name in target.names]
        if self.dist.is_main:
            summary = adapt_batchnorm(start, frames, self.final_path("adapt-bn"), size=self.cfg.data.target_size,
                                      batch_size=max(2, self.cfg.data.batch_size), device=str(self.device),
                                      progress=self.progress, trusted=self._trusted(start))
            self._record({"stage": "adapt-bn", "done": True, "from": start, **summary})

    def run_pseudo_label(self) -> None:
        cfg = self.cfg
        model = self._load(self._input_checkpoint("pseudo-label"))
        target = self._dataset("target", build_transform())
        if self.dist.is_main:  # one writer; the set is read three times, which is cheap next to training
            report = generate_pseudo_labels(model, target, self.stage_dir("pseudo-label"), device=self.device,
                                            size=cfg.data.target_size, cap=cfg.method.threshold_cap,
                                            progress=self.progress, workers=self._workers(1),
                                            resize=cfg.data.resize)
            self._record({"stage": "pseudo-label", "done": True, "ignored_share": report["ignored_share"]})
            self._report_data("pseudo-label", report["unreadable"])

    def run_self_train(self) -> None:
        cfg = self.cfg
        if cfg.method.self_train_from_imagenet:
            model = self._build_model(cfg.data.target_size)
        else:
            model = self._load(self._input_checkpoint("self-train"))
        if cfg.method.self_train_bn is not None and model.info.arch != "deeplabv2_vgg16":
            # The public R101 self-training trains (synced) batch norm where the earlier stages froze it.
            model = set_batchnorm_mode(model, cfg.method.self_train_bn)
            model.info.bn = cfg.method.self_train_bn
        label_dir = self.stage_dir("pseudo-label")
        thresholds = os.path.join(label_dir, "thresholds.json")
        if not os.path.isfile(thresholds):
            raise FileNotFoundError(f"self-training reads pseudo-labels from {label_dir}: run stage pseudo-label "
                                    "first")
        with open(thresholds) as f:
            unlabelled = set(json.load(f).get("unreadable", ()))  # no pseudo-label was written for these
        target = self._dataset("target", None)
        names = [n for n in target.names if n not in unlabelled]
        space = LabelSpace("model", tuple(model.info.class_names), tuple(model.info.palette))
        labelled = ImagesAndLabelMaps(target.image_root, names, label_dir, space,
                                  stage_transform(cfg, "self_train", uint8=self.uint8),
                                  cfg.data.on_corrupt)

        def make_step(optimizer, consumed):
            streams = self._streams("self-train", consumed, cfg.solver.self_train, target=labelled)
            step = SupervisedStep(model, optimizer, streams["target"], self.device, cfg.amp, self.dist, 0.0)
            step.consumed = lambda: {"target": streams["target"].consumed}
            step.unreadable.update(unlabelled)  # left out from the start: listed with this stage's skips
            return step
        self._train_stage("self-train", model, cfg.solver.self_train, make_step)


    def run_mean_teacher(self) -> None:
        """The one-stage recipe (see :mod:`sdca.engine.mean_teacher`): from the source warm-up, the student is
        trained on source CE and class-mixed, teacher-labelled target images; the final checkpoint holds the
        student (what evaluation, export and the next stage read), the teacher and, with a contrastive term, the
        projection heads and the statistics in ``extra["modules"]`` and ``statistics``."""
        from ..models.projection import ProjectionHead
        from .mean_teacher import MeanTeacherStep, make_teacher

        cfg = self.cfg
        mt = cfg.method.mean_teacher
        model = self._load(self._input_checkpoint("mean-teacher"))
        recipe = stage_data(cfg, "mean_teacher")
        source_in = recipe.crop or (None if recipe.scale_base == "raw" else tuple(cfg.data.source_size))
        target_in = recipe.crop or (None if recipe.scale_base == "raw" else tuple(cfg.data.target_size))
        if mt.class_mix and tuple(source_in or ()) != tuple(target_in or ()):
            raise ValueError(f"method.mean_teacher.class_mix pastes source pixels onto target images, so both must "
                             f"come out at one size: data.source_size {cfg.data.source_size} and data.target_size "
                             f"{cfg.data.target_size} differ; set data.stages.mean_teacher.crop=[W, H] (or equal "
                             "sizes)")
        modules = {"teacher": make_teacher(model)}
        trained = []
        statistics = None
        if mt.contrast != "none":
            dim = model.feature_dim
            if mt.contrast == "projection":
                modules["projection"] = ProjectionHead(dim, mt.projection_dim, mt.projection_hidden).to(self.device)
                modules["teacher_projection"] = make_teacher(modules["projection"])
                trained = ["projection"]
                dim = mt.projection_dim
            # "features" as init-stats names the backbone's (so that sdca inspect reads them); the head's apart.
            key = "features" if mt.contrast == "backbone" else "projection"
            statistics = {key: SemanticDistribution(model.num_classes, dim, "diag", device=self.device)}
        model.train()
        source = self._dataset("source", stage_transform(cfg, "mean_teacher", uint8=self.uint8),
                               labelled_required=True)
        target = self._dataset("target", stage_transform(cfg, "mean_teacher", "target", uint8=self.uint8))

        def make_step(optimizer, consumed):
            streams = self._streams("mean-teacher", consumed, cfg.solver.mean_teacher, source=source, target=target)
            step = MeanTeacherStep(model, optimizer, streams["source"], streams["target"], modules["teacher"], mt,
                                   self.device, cfg.amp, self.dist, projection=modules.get("projection"),
                                   teacher_projection=modules.get("teacher_projection"),
                                   statistics=next(iter(statistics.values())) if statistics else None,
                                   seed=stream_seed(cfg.seed, "mean-teacher", 2) + self.dist.rank,
                                   diagnostics_period=cfg.solver.log_period)
            step.consumed = lambda: {k: s.consumed for k, s in streams.items()}
            return step
        self._train_stage("mean-teacher", model, cfg.solver.mean_teacher, make_step, statistics=statistics,
                          modules=modules, trained=trained)
