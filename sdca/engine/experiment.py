"""`sdca experiment`: the controlled SynthDrive comparison docs/results.md reports.

For each seed: source-only; the target-supervised oracle; AdaBN (source-only with batch-norm statistics
re-estimated on target images); self-training from source-only; the adapt stage with lambda_feat = lambda_out
= 0 (same batches, same steps: the control that isolates the SDCA loss); SDCA with the paper's loss and with the
public code's loss; SDCA + self-training. tau, lambda, the batch-norm mode and the target mask (Eq. 5 or its
class-balanced form) are chosen by a sweep on a labelled *validation* split of the real domain (seed 0); every
row is reported on a separate test split. Each finished piece is saved, so an interrupted run resumes.

The one-stage mean teacher of SDCA's successor (SePiCo; stage mean-teacher) from each seed's source-only model,
as many steps as the adapt stage, with the adaptation stages' SGD and learning rate: without any contrast, with
SDCA's loss on a projection head, with it on the backbone features, with ClassMix off, and the plain one followed by
AdaBN (does it lack only target batch-norm statistics?). Its EMA alpha and
confidence threshold are chosen on validation first (no contrast), then the contrastive lambda and tau (on the
projection head; the backbone row takes the same). Its runs carry the target labels for monitoring only (the
teacher's pseudo-label precision over the stage); no loss reads them.

Two models (``--model``): ``small`` (the width-16 network from scratch at 256 x 128, the first experiment) and
``lite0`` (EfficientNet-Lite0 from ImageNet at 384 x 192, output stride 16: the paper's regime of a pretrained
backbone). The Lite0 plan is shorter and its sweep smaller (a step costs about 3x the small model's), and
its warm-up batch-norm mode (trained vs frozen ImageNet statistics) is itself chosen on validation first.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .._atomic import atomic_write_text
from . import markdown as md
from .demo import synthdrive_config
from .plan import Plan

# Longer than the demo: the oracle needs it to separate from source-only (600 warm-up steps left it at 17.6).
EXPERIMENT_PLAN = Plan(300, 300, 100, source_iters=800, adapt_iters=400, self_train_iters=400, batch=4,
                       mean_teacher_iters=400)
EXPERIMENT_QUICK = Plan(24, 24, 12, source_iters=20, adapt_iters=10, self_train_iters=10, batch=2,
                        mean_teacher_iters=10)
# Lite0 at 384 x 192: about 3x the small model's cost per step, so fewer steps (it starts from ImageNet).
LITE0_PLAN = Plan(300, 300, 100, source_iters=300, adapt_iters=100, self_train_iters=100, batch=4,
                  mean_teacher_iters=100)
PLANS = {"small": EXPERIMENT_PLAN, "lite0": LITE0_PLAN}
# Validation sweep: first batch-norm mode x loss weight (tau 0.5), then tau around the best of those.
SWEEP_BN = ("train", "target")
SWEEP_LAMBDA = {"small": (0.0, 0.1, 1.0), "lite0": (0.1, 1.0)}  # lite0: the control rows measure lambda = 0
SWEEP_TAU = {"small": (0.1, 1.0), "lite0": (0.1,)}
WARMUP_BN = {"small": ("train",), "lite0": ("train", "frozen")}  # chosen on validation, seed 0
DELTA = 0.9
# Mean teacher on validation (seed 0): alpha, then the threshold at the best alpha (no contrast); then the
# contrastive term on the projection head: SePiCo's (lambda 1, tau 100) and the SDCA experiment's tau 0.5.
# The EMA ramp min(1 - 1/(t+1), alpha) reaches alpha only after 1/(1 - alpha) - 1 steps: 0.99 needs 99, 0.999
# needs 999; until then the teacher is the plain average of every iterate, so in a 100-step run they barely differ.
# 0.9 caps at step 9 and is the one short-horizon teacher. Ties go to the first point: the recipe's default.
MT_SWEEP_ALPHA = (0.999, 0.99, 0.9)
MT_SWEEP_THRESHOLD = (0.9,)  # beside the default 0.968
MT_SWEEP_CONTRAST = ((1.0, 100.0), (0.1, 0.5))  # (lambda, tau): SePiCo's, and the SDCA rows' chosen setting
MT_PROJECTION_DIM = 64  # the head's output width on SynthDrive (SePiCo's 512 is for a 2048-wide backbone)
# --mean-teacher-only: no sweep. The mean teacher takes the recipe's defaults (SePiCo's alpha, threshold and
# contrast), SDCA's control the settings the full experiment's earlier validation sweep chose (docs/results.md).
MT_DEFAULT = {"alpha": 0.999, "thr": 0.968}
MT_DEFAULT_CONTRAST = dict(MT_DEFAULT, contrast="projection", lam=1.0, tau=100.0)
EARLIER_CHOICE = {"small": {"bn": "target", "lam": 0.1, "tau": 0.5, "cb": True},
                  "lite0": {"bn": "target", "lam": 0.1, "tau": 0.5}}

ROWS = [  # (key, label, batch norm during the run that made it)
    ("source", "source-only", "trained on source"),
    ("oracle", "oracle (target labels)", "trained on target"),
    ("adabn", "AdaBN (source-only, target BN statistics)", "re-estimated on target"),
    ("st_source", "self-training from source-only", "trained on target"),
    ("control", "adapt, lambda = 0 (control)", "adapt_bn={bn}"),
    ("sdca_paper", "SDCA, paper loss", "adapt_bn={bn}"),
    ("sdca_public", "SDCA, public-code loss", "adapt_bn={bn}"),
    ("sdca_st", "SDCA + self-training", "trained on target"),
    ("mt", "mean teacher (ClassMix, no contrast)", "trained (teacher: batch statistics)"),
    ("mt_proj", "mean teacher + SDCA loss on a projection head", "trained (teacher: batch statistics)"),
    ("mt_backbone", "mean teacher + SDCA loss on the backbone features", "trained (teacher: batch statistics)"),
    ("mt_nomix", "mean teacher, ClassMix off", "trained (teacher: batch statistics)"),
    ("mt_adabn", "mean teacher + AdaBN", "re-estimated on target"),
]
MT_ROWS = ("mt", "mt_proj", "mt_backbone", "mt_nomix")


class Experiment:
    def __init__(self, out_dir: str = "runs/experiment", *, quick: bool = False, progress: bool = False,
                 model: str = "small", plan=None, device: str = "cpu", frame_size=None,
                 amp: Optional[str] = None, warmup_bn: Optional[str] = None, mt_sweep: bool = True):
        """``plan``, ``device``, ``frame_size`` and ``amp`` replace the CPU experiment's (the GPU script's scale);
        ``warmup_bn`` fixes the warm-up's batch-norm mode instead of choosing it on validation; ``mt_sweep=False``
        gives the mean-teacher rows the recipe's defaults (MT_DEFAULT) instead of a validation choice."""
        if model not in PLANS:
            raise ValueError(f"model must be one of {', '.join(PLANS)}, got {model!r}")
        self.out_dir = os.path.abspath(out_dir)
        self.model = model
        self.plan = Plan.of(plan or (EXPERIMENT_QUICK if quick else PLANS[model]))
        self.device, self.frame_size, self.amp, self.fixed_warmup_bn = device, frame_size, amp, warmup_bn
        self.mt_sweep = mt_sweep
        self.quick = quick
        self.progress = progress
        self.cache = os.path.join(os.path.dirname(self.out_dir), "synthdrive-cache")
        os.makedirs(os.path.join(self.out_dir, "results"), exist_ok=True)

    # ------------------------------------------------------------------------------------ bookkeeping
    def _result_path(self, key: str) -> str:
        return os.path.join(self.out_dir, "results", key + ".json")

    def result(self, key: str) -> Optional[dict]:
        path = self._result_path(key)
        return json.loads(Path(path).read_text()) if os.path.isfile(path) else None

    def results(self, prefix: str) -> List[dict]:
        """Every saved result whose key starts with ``prefix``, in key order (the sweep tables)."""
        folder = os.path.join(self.out_dir, "results")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        return [self.result(n[:-len(".json")]) for n in names if n.startswith(prefix) and n.endswith(".json")]

    def _save(self, key: str, value: dict) -> dict:
        atomic_write_text(self._result_path(key), json.dumps(value, indent=1))
        return value

    def _cfg(self, name: str, seed: int, *, source_domain: str = "sim", method: Optional[dict] = None,
             bn: Optional[str] = None, mean_teacher: Optional[dict] = None):
        return synthdrive_config(os.path.join(self.out_dir, name), self.plan, seed, self.cache,
                                 source_domain=source_domain, val_split="val", method=method, model=self.model,
                                 model_overrides={"bn": bn or self.warmup_bn()}, mean_teacher=mean_teacher,
                                 target_labels=mean_teacher is not None, device=self.device,
                                 frame_size=self.frame_size, amp=self.amp)

    def _score(self, model, cfg) -> dict:
        """mIoU on the validation split (for choices) and the test split (for the report)."""
        import dataclasses

        import torch

        from .builders import build_dataset
        from .evaluator import evaluate

        out = {}
        for split in ("val", "test"):
            ds_cfg = dataclasses.replace(cfg.data.val, split=split)
            res = evaluate(model, build_dataset(ds_cfg, 19), device=torch.device(self.device), size=cfg.data.target_size,
                           subsets=None, progress=False)
            out[split] = {"mIoU": res["mIoU"], "IoU": res["IoU"]}
        return out

    def _runner(self, cfg, init: Optional[str] = None):
        from .runner import Runner

        return Runner(cfg, progress=self.progress, init_checkpoint=init)

    def _scored_stage(self, key: str, cfg, stages: Sequence[str], init: Optional[str], extra: dict) -> dict:
        from ..models import load_model

        done = self.result(key)
        if done:
            return done
        start = time.time()
        runner = self._runner(cfg, init)
        for stage in stages:  # one call per stage: pseudo-label and self-train both start from ``init``
            runner.train([stage])
        model = load_model(runner.final_path(stages[-1]), device=self.device)
        return self._save(key, dict(self._score(model, cfg), seconds=round(time.time() - start, 1),
                                    checkpoint=runner.final_path(stages[-1]), **extra))

    # ---------------------------------------------------------------------------------------- pieces
    def warmup(self, bn: str) -> dict:
        """Seed 0's source-only warm-up with batch-norm mode ``bn`` (the candidates of WARMUP_BN). Frozen
        ImageNet statistics take half the learning rate (the prototype's 0.005: at 0.01 the loss diverged); a
        run that still diverges is recorded as such (mIoU 0) rather than stopping the experiment."""
        from .loop import NonFiniteLoss

        key = "s0_source" if bn == WARMUP_BN[self.model][0] else f"s0_source_bn-{bn}"
        cfg = self._cfg(key, 0, bn=bn)
        if bn == "frozen":
            cfg.solver.source.lr /= 2
        try:
            return self._scored_stage(key, cfg, ["source"], None, {"bn": bn, "lr": cfg.solver.source.lr})
        except NonFiniteLoss as exc:
            failed = {"mIoU": 0.0, "IoU": {}}
            return self._save(key, {"val": failed, "test": failed, "diverged": str(exc), "bn": bn,
                                    "lr": cfg.solver.source.lr})

    def warmup_bn(self) -> str:
        """The warm-up batch-norm mode with the best validation mIoU (the first candidate needs no run)."""
        candidates = WARMUP_BN[self.model]
        if self.fixed_warmup_bn:
            return self.fixed_warmup_bn
        if len(candidates) == 1:
            return candidates[0]
        return max(candidates, key=lambda bn: self.warmup(bn)["val"]["mIoU"] or 0.0)

    def source(self, seed: int, domain: str = "sim") -> dict:
        key = f"s{seed}_{'source' if domain == 'sim' else 'oracle'}"
        if key == "s0_source" and WARMUP_BN[self.model][0] != self.warmup_bn():
            key = f"s0_source_bn-{self.warmup_bn()}"  # the validation-chosen run is seed 0's source-only
        cfg = self._cfg(key, seed, source_domain=domain)
        return self._scored_stage(key, cfg, ["source"], None, {})

    def adabn(self, seed: int, after: Optional[str] = None) -> dict:
        """AdaBN of seed's source-only model, or (``after``: a row's key) of that row's final model."""
        from ..data import build_transform
        from ..models import load_model, save_checkpoint
        from .batchnorm import recompute_batchnorm
        from .builders import build_dataset

        key = f"s{seed}_adabn" if after is None else f"{after}_adabn"
        done = self.result(key)
        if done:
            return done
        cfg = self._cfg(key, seed)
        start = time.time()
        trained = self.source(seed) if after is None else self.result(after)
        model = load_model(trained["checkpoint"], device=self.device)
        target = build_dataset(cfg.data.target, 19, build_transform(size=cfg.data.target_size))
        batches = recompute_batchnorm(model, target, batch_size=cfg.data.batch_size, device=self.device)
        path = os.path.join(self.out_dir, key, "final.pt")
        save_checkpoint(path, model, extra={"stage": "adabn", "batches": batches})
        return self._save(key, dict(self._score(model.eval(), cfg), seconds=round(time.time() - start, 1),
                                    checkpoint=path))

    def init_stats(self, seed: int, variant: str) -> str:
        cfg = self._cfg(f"s{seed}_stats_{variant}", seed, method=self._variant(variant))
        runner = self._runner(cfg, self.source(seed)["checkpoint"])
        runner.train(["init-stats"])
        return runner.final_path("init-stats")

    @staticmethod
    def _variant(variant: str) -> dict:
        return {"variant": "paper", "covariance": "full"} if variant == "paper" else {"variant": "reference",
                                                                                    "covariance": "diag"}

    @staticmethod
    def tag(p: dict) -> str:
        """A setting's name in result keys and run folders: bn, lambda, tau, and _cb for the class-balanced mask."""
        return f"bn-{p['bn']}_lam-{p['lam']}_tau-{p['tau']}" + ("_cb" if p.get("cb") else "")

    @staticmethod
    def control_of(p: dict) -> dict:
        """lambda = 0 trains the same whatever tau or the mask: one control per batch-norm mode."""
        return {"bn": p["bn"], "lam": 0.0, "tau": 0.5}

    def adapt(self, key: str, seed: int, variant: str, p: dict) -> dict:
        if seed == 0 and variant == "paper" and not key.startswith("sweep_"):
            # The same config and seed as a sweep point is the same (deterministic) run: reuse it.
            done = self.result("sweep_" + self.tag(p))
            if done and not self.result(key):
                self._save(key, done)
        method = dict(self._variant(variant), tau=p["tau"], lambda_feat=p["lam"], lambda_out=p["lam"], delta=DELTA,
                      adaptation_bn=p["bn"], class_balanced_mask=bool(p.get("cb")))
        cfg = self._cfg(key, seed, method=method)
        return self._scored_stage(key, cfg, ["adapt"], self.init_stats(seed, variant), {"method": method})

    def self_train(self, key: str, seed: int, start: dict) -> dict:
        cfg = self._cfg(key, seed)
        return self._scored_stage(key, cfg, ["pseudo-label", "self-train"], start["checkpoint"], {})

    # ----------------------------------------------------------------------------------------- sweep
    def sweep_grid(self) -> List[dict]:
        """Round 1: batch-norm mode x loss weight at tau 0.5 (lambda 0 is the control for each mode)."""
        return [{"bn": bn, "lam": lam, "tau": 0.5} for bn in SWEEP_BN for lam in SWEEP_LAMBDA[self.model]]

    def sweep_taus(self) -> List[dict]:
        """Round 2: tau around the round-1 best."""
        return [dict(self.best(self.sweep_grid()), tau=t) for t in SWEEP_TAU[self.model]]

    def sweep_balanced(self) -> List[dict]:
        """Round 3: the class-balanced target mask at the best batch-norm mode and tau, for each lambda > 0
        (lite0: at the best lambda only)."""
        b = self.best(self.sweep_grid() + self.sweep_taus())
        if self.model == "lite0":
            return [dict(b, cb=True)]
        return [dict(b, lam=lam, cb=True) for lam in SWEEP_LAMBDA[self.model] if lam > 0]

    def sweep_point(self, p: dict) -> dict:
        return self.adapt("sweep_" + self.tag(p), 0, "paper", p)

    def best(self, points: List[dict]) -> dict:
        """The validation-best point with lambda > 0 (lambda = 0 is the control, not a candidate)."""
        scored = [dict(p, val=self.sweep_point(p)["val"]["mIoU"] or 0.0) for p in points if p["lam"] > 0]
        b = max(scored, key=lambda p: p["val"])
        return {k: b[k] for k in ("bn", "lam", "tau", "cb") if k in b}

    def choice(self) -> dict:
        return self.best(self.sweep_grid() + self.sweep_taus() + self.sweep_balanced())

    # --------------------------------------------------------------------------------- mean teacher
    @staticmethod
    def mt_tag(p: dict) -> str:
        """A mean-teacher setting's name: alpha, threshold, contrast features (lambda, tau), ClassMix off."""
        tag = f"a-{p['alpha']}_thr-{p['thr']}"
        if p.get("contrast", "none") != "none":
            tag += f"_{p['contrast']}_lam-{p['lam']}_tau-{p['tau']}"
        return tag + ("_nomix" if p.get("nomix") else "")

    def mean_teacher(self, key: str, seed: int, p: dict) -> dict:
        if seed == 0 and not key.startswith("mtsweep_"):
            done = self.result("mtsweep_" + self.mt_tag(p))  # the same run as a sweep point: reuse it
            if done and not self.result(key):
                self._save(key, done)
        mt = {"alpha": p["alpha"], "threshold": p["thr"], "contrast": p.get("contrast", "none"),
              "lambda_contrast": p.get("lam", 0.0), "tau": p.get("tau", 100.0), "class_mix": not p.get("nomix"),
              "projection_dim": MT_PROJECTION_DIM}
        cfg = self._cfg(key, seed, mean_teacher=mt)
        return self._scored_stage(key, cfg, ["mean-teacher"], self.source(seed)["checkpoint"], {"mean_teacher": mt})

    def mt_sweep_point(self, p: dict) -> dict:
        return self.mean_teacher("mtsweep_" + self.mt_tag(p), 0, p)

    def _mt_best(self, points: List[dict], run: bool = True) -> Optional[dict]:
        """The validation-best point; ``run=False``: from finished points only (None if any is missing)."""
        scores = []
        for p in points:
            r = self.mt_sweep_point(p) if run else self.result("mtsweep_" + self.mt_tag(p))
            if r is None:
                return None
            scores.append(r["val"]["mIoU"] or 0.0)
        return points[max(range(len(points)), key=scores.__getitem__)]

    def mt_sweep_alpha(self) -> List[dict]:
        return [{"alpha": a, "thr": 0.968} for a in MT_SWEEP_ALPHA]

    def mt_sweep_threshold(self, run: bool = True) -> Optional[List[dict]]:
        best = self._mt_best(self.mt_sweep_alpha(), run)
        return None if best is None else [dict(best, thr=t) for t in MT_SWEEP_THRESHOLD]

    def mt_base(self, run: bool = True) -> Optional[dict]:
        """The validation-best alpha and threshold (no contrast)."""
        thresholds = self.mt_sweep_threshold(run)
        return None if thresholds is None else self._mt_best(self.mt_sweep_alpha() + thresholds, run)

    def mt_sweep_contrast(self, run: bool = True) -> Optional[List[dict]]:
        base = self.mt_base(run)
        return None if base is None else [dict(base, contrast="projection", lam=lam, tau=tau)
                                          for lam, tau in MT_SWEEP_CONTRAST]

    def mt_choice(self, run: bool = True) -> Optional[Dict[str, dict]]:
        """Each mean-teacher row's setting: the base for mt and mt_nomix, the best contrast point on the projection
        head for mt_proj and the same lambda, tau on the backbone features for mt_backbone. ``run=False``: from
        finished sweep points only (None while any is missing). Without the sweep: the recipe's defaults."""
        if not self.mt_sweep:
            return {"mt": MT_DEFAULT, "mt_nomix": dict(MT_DEFAULT, nomix=True), "mt_proj": MT_DEFAULT_CONTRAST,
                    "mt_backbone": dict(MT_DEFAULT_CONTRAST, contrast="backbone")}
        base, contrast = self.mt_base(run), self.mt_sweep_contrast(run)
        proj = None if contrast is None else self._mt_best(contrast, run)
        if base is None or proj is None:
            return None
        return {"mt": base, "mt_nomix": dict(base, nomix=True), "mt_proj": proj,
                "mt_backbone": dict(proj, contrast="backbone")}

    # ------------------------------------------------------------------------------------------ rows
    def baselines(self, seed: int) -> None:
        self.source(seed)
        self.adabn(seed)
        self.self_train(f"s{seed}_st_source", seed, self.source(seed))
        self.init_stats(seed, "paper")
        self.init_stats(seed, "public")

    def row_checkpoint(self, row: str, seed: int, choice: dict) -> str:
        """The checkpoint a row's result came from; source-only's init-stats twin (same weights, plus the source
        statistics the alignment diagnostics need)."""
        if row == "source":
            return self.init_stats(seed, "paper")
        return self.result(self.row_key(row, seed, choice))["checkpoint"]

    def inspect_row(self, row: str, choice: dict, frames: int = 40) -> Optional[dict]:
        """`sdca inspect` of a row's seed-0 model: source frames vs the labelled validation split."""
        from .inspect import inspect_checkpoint, labelled_domains

        if self.result(self.row_key(row, 0, choice)) is None:
            return None
        folder = os.path.join(self.out_dir, "inspect", row)
        if os.path.isfile(os.path.join(folder, "inspect.json")):
            return json.load(open(os.path.join(folder, "inspect.json")))
        source, target = labelled_domains(self._cfg(f"s0_{row}", 0))
        return inspect_checkpoint(self.row_checkpoint(row, 0, choice), source, target, folder, target_labels=True,
                                  frames=12 if self.quick else frames, progress=self.progress, title=row)

    def row_key(self, row: str, seed: int, choice: dict) -> str:
        """Result key of a row; adapted rows carry their setting, so a changed choice never reuses stale runs."""
        if row in ("source", "oracle", "adabn", "st_source"):
            return f"s{seed}_{row}"
        if row == "mt_adabn":
            return self.row_key("mt", seed, choice) + "_adabn"
        if row in MT_ROWS:
            chosen = self.mt_choice(run=False)  # never starts a run: a report of a partial sweep lists no MT rows
            return f"s{seed}_{row}_" + (self.mt_tag(chosen[row]) if chosen else "unchosen")
        return f"s{seed}_{row}_{self.tag(self.control_of(choice) if row == 'control' else choice)}"

    def adapted(self, row: str, seed: int, choice: dict) -> dict:
        key = self.row_key(row, seed, choice)
        if row == "control":
            return self.adapt(key, seed, "paper", self.control_of(choice))
        if row == "sdca_paper":
            return self.adapt(key, seed, "paper", choice)
        if row == "sdca_public":
            return self.adapt(key, seed, "public", choice)
        if row == "sdca_st":
            return self.self_train(key, seed, self.adapted("sdca_paper", seed, choice))
        if row == "mt_adabn":
            self.adapted("mt", seed, choice)
            return self.adabn(seed, after=self.row_key("mt", seed, choice))
        if row in MT_ROWS:
            return self.mean_teacher(key, seed, self.mt_choice()[row])
        raise ValueError(f"unknown row {row!r}")


# --------------------------------------------------------------------------------------- orchestration
def _task(out_dir: str, quick: bool, model: str, threads: int, name: str, args: tuple, mt_sweep: bool = True):
    import torch

    torch.set_num_threads(threads)
    exp = Experiment(out_dir, quick=quick, model=model, mt_sweep=mt_sweep)
    return getattr(exp, name)(*args)


def run_experiment(out_dir: str = "runs/experiment", *, seeds: Sequence[int] = (0, 1, 2), jobs: int = 1,
                   quick: bool = False, model: str = "small", log=print, mean_teacher_only: bool = False,
                   sweep_mean_teacher: bool = False) -> str:
    """Run (or resume) every piece, ``jobs`` at a time, then write ``report.md``; returns its path.

    ``mean_teacher_only``: the controls (source-only, oracle, AdaBN, self-training from source-only, the lambda = 0
    adapt control at the earlier sweep's batch-norm mode) and the four mean-teacher rows at the recipe's defaults;
    no SDCA rows and no sweep (the part that fits about an hour and a half on 2 cores). ``sweep_mean_teacher``
    with it: the mean teacher's validation sweep (seed 0) first, and its rows at the setting it chose."""
    mt_sweep = sweep_mean_teacher or not mean_teacher_only
    exp = Experiment(out_dir, quick=quick, model=model, mt_sweep=mt_sweep)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

    def parallel(calls):
        if jobs <= 1:
            return [_task(out_dir, quick, model, threads, n, a, mt_sweep) for n, a in calls]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_task, out_dir, quick, model, threads, n, a, mt_sweep) for n, a in calls]
            return [f.result() for f in futures]

    start = time.time()
    if mean_teacher_only:
        choice = EARLIER_CHOICE[model]
        if len(WARMUP_BN[model]) > 1:
            parallel([("warmup", (bn,)) for bn in WARMUP_BN[model]])
        # The most informative first (the report can be written from whatever has finished): the plain mean
        # teacher needs only source-only; then the oracle, SDCA's loss on the head, the other controls.
        log(f"experiment (mean teacher and controls): source-only for seeds {list(seeds)}")
        parallel([("source", (s, "sim")) for s in seeds])
        if sweep_mean_teacher:
            # Each round's odd slot takes a control, so that both workers stay busy through the sweep.
            log(f"experiment: mean-teacher sweep on validation (seed 0; {time.time() - start:.0f} s so far)")
            parallel([("mt_sweep_point", (p,)) for p in exp.mt_sweep_alpha()] + [("adabn", (s,)) for s in seeds])
            parallel([("mt_sweep_point", (p,)) for p in exp.mt_sweep_threshold()] + [("source", (0, "real"))])
            parallel([("mt_sweep_point", (p,)) for p in exp.mt_sweep_contrast()])
        log(f"experiment: AdaBN and the mean teacher at {exp.mt_choice()['mt']} ({time.time() - start:.0f} s so far)")
        parallel([("adabn", (s,)) for s in seeds] + [("adapted", ("mt", s, choice)) for s in seeds])
        parallel([("adapted", ("mt_adabn", s, choice)) for s in seeds])  # is what it lacks batch-norm statistics?
        log(f"experiment: the oracle and SDCA's loss on the projection head ({time.time() - start:.0f} s so far)")
        parallel([("source", (s, "real")) for s in seeds] + [("adapted", ("mt_proj", s, choice)) for s in seeds])
        log(f"experiment: self-training from source-only, the lambda = 0 control ({time.time() - start:.0f} s so far)")
        parallel([("baselines", (s,)) for s in seeds])
        parallel([("adapted", ("control", s, choice)) for s in seeds])
        log(f"experiment: the backbone and no-ClassMix rows ({time.time() - start:.0f} s so far)")
        parallel([("adapted", (row, s, choice)) for s in seeds for row in ("mt_backbone", "mt_nomix")])
        log("experiment: sdca inspect on the seed-0 model of each row")
        parallel([("inspect_row", (row, choice)) for row, _, _ in ROWS])
        path = write_report(exp, seeds, choice)
        log(f"experiment: done in {time.time() - start:.0f} s: {path}")
        return path
    if len(WARMUP_BN[model]) > 1:
        log(f"experiment: warm-up batch norm {' vs '.join(WARMUP_BN[model])} on validation (seed 0)")
        parallel([("warmup", (bn,)) for bn in WARMUP_BN[model]])
        log(f"experiment: warm-up batch norm chosen: {exp.warmup_bn()}")
    log(f"experiment: baselines (source-only, oracle, AdaBN, self-training) for seeds {list(seeds)}")
    parallel([("source", (s, "sim")) for s in seeds] + [("source", (s, "real")) for s in seeds])
    parallel([("baselines", (s,)) for s in seeds])
    log(f"experiment: validation sweep on seed 0 ({time.time() - start:.0f} s so far)")
    parallel([("sweep_point", (p,)) for p in exp.sweep_grid()])
    parallel([("sweep_point", (p,)) for p in exp.sweep_taus()])
    parallel([("sweep_point", (p,)) for p in exp.sweep_balanced()])
    choice = exp.choice()
    log(f"experiment: chosen on validation: {choice}; adapted rows for every seed")
    parallel([("adapted", (row, s, choice)) for s in seeds for row in ("control", "sdca_paper", "sdca_public")])
    parallel([("adapted", ("sdca_st", s, choice)) for s in seeds])
    log(f"experiment: mean-teacher sweep on validation (seed 0; {time.time() - start:.0f} s so far)")
    parallel([("mt_sweep_point", (p,)) for p in exp.mt_sweep_alpha()])
    parallel([("mt_sweep_point", (p,)) for p in exp.mt_sweep_threshold()])
    parallel([("mt_sweep_point", (p,)) for p in exp.mt_sweep_contrast()])
    log(f"experiment: mean teacher chosen on validation: {exp.mt_choice()}; its rows for every seed")
    parallel([("adapted", (row, s, choice)) for s in seeds for row in MT_ROWS + ("mt_adabn",)])
    log("experiment: sdca inspect on the seed-0 model of each row")
    parallel([("inspect_row", (row, choice)) for row, _, _ in ROWS])
    path = write_report(exp, seeds, choice)
    log(f"experiment: done in {time.time() - start:.0f} s: {path}")
    return path


def _mean_std(values: List[float]):
    import statistics

    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(exp: Experiment, seeds: Sequence[int], choice: dict) -> Dict[str, dict]:
    table = {}
    for row, label, bn in ROWS:
        per_seed = [exp.result(exp.row_key(row, s, choice)) for s in seeds]
        if any(r is None for r in per_seed):
            continue
        test = [100 * (r["test"]["mIoU"] or 0.0) for r in per_seed]
        mean, std = _mean_std(test)
        table[row] = {"label": label, "bn": bn.format(bn=choice["bn"]), "test": test, "mean": mean, "std": std,
                      "IoU": {c: [r["test"]["IoU"][c] for r in per_seed] for c in per_seed[0]["test"]["IoU"]}}
    return table


def write_report(exp: Experiment, seeds: Sequence[int], choice: dict) -> str:
    from ..data.synthdrive import GENERATOR_VERSION

    table = collect(exp, seeds, choice)
    p = exp.plan
    sweep = exp.results("sweep_")
    model = ("384x192; deeplabv2_lite0 (EfficientNet-Lite0 from ImageNet, output stride 16, batch norm "
             f"{exp.warmup_bn()} in the warm-up)" if exp.model == "lite0"
             else "256x128; deeplabv2_small (width 16) from scratch")
    lines = ["# SDCA on SynthDrive: the controlled experiment", "",
             f"SynthDrive {GENERATOR_VERSION}, sim -> real, {model}; "
             f"{p.source_frames} source frames, {p.target_frames} target frames (unlabelled, except for the oracle), "
             f"{p.val_frames} validation and {p.val_frames} test frames of the real domain. Iterations: source "
             f"{p.source_iters}, adapt {p.adapt_iters}, self-training {p.self_train_iters}, batch {p.batch} per "
             "domain. "
             f"Seeds {', '.join(map(str, seeds))}. Test-split mIoU (19 classes; a class absent from the test "
             "split is left out).", "",
             (f"Chosen on the validation split (seed 0): adapt_bn={choice['bn']}, lambda_feat = lambda_out = "
              f"{choice['lam']}, tau = {choice['tau']}, delta = {DELTA}, target mask "
              f"{'class-balanced (per-class min(delta, batch median))' if choice.get('cb') else 'Eq. 5 (fixed delta)'}."
              if sweep else
              # --mean-teacher-only runs no SDCA sweep: saying "chosen" here would claim a choice this run never made.
              f"No SDCA sweep in this run (--mean-teacher-only): the lambda = 0 control takes adapt_bn={choice['bn']}, "
              "the full experiment's earlier validation choice for this model."),
             "",
             *md.header(["row", "batch norm", "mean ± std", *(f"seed {s}" for s in seeds)], "llr" + "r" * len(seeds))]
    for row in table.values():
        lines.append(f"| {row['label']} | {row['bn']} | {row['mean']:.1f} ± {row['std']:.1f} | "
                     + " | ".join(f"{v:.1f}" for v in row["test"]) + " |")
    if "source" in table and "oracle" in table and "sdca_st" in table:
        gap = table["oracle"]["mean"] - table["source"]["mean"]
        rec = (table["sdca_st"]["mean"] - table["source"]["mean"]) / gap if gap > 0 else float("nan")
        lines += ["", f"Source-only -> oracle gap: {gap:.1f} points; SDCA + self-training recovers "
                      f"{100 * rec:.0f}% of it."]
    lines += _goal(exp, seeds, choice, table)
    rows = list(table.values())
    # Per class, each row's test IoU averaged over seeds (classes no row ever scored left out): table and figure.
    class_means = {name: [_mean_iou(r["IoU"][name]) for r in rows] for name in (rows[0]["IoU"] if rows else ())}
    class_means = {name: means for name, means in class_means.items() if any(m is not None for m in means)}
    if rows:
        lines += ["", "## Per-class test IoU, mean over seeds", "",
                  *md.table(["class", *(r["label"] for r in rows)], "l" + "r" * len(rows),
                            ([name, *("n/a" if m is None else f"{m:.1f}" for m in means)]
                             for name, means in class_means.items()))]
    if sweep:
        lines += ["", "## Validation sweep (seed 0, validation split)", "",
                  *md.header(["adapt_bn", "lambda", "tau", "target mask", "val mIoU"], "lrrlr")]
    for r in sweep:
        m = r["method"]
        mask = "class-balanced" if m.get("class_balanced_mask") else "Eq. 5"
        lines.append(f"| {m.get('adaptation_bn', m.get('adapt_bn'))} | {m['lambda_feat']} | {m['tau']} | {mask} | "
                     f"{100 * (r['val']['mIoU'] or 0):.1f} |")
    if len(WARMUP_BN[exp.model]) > 1:
        lines += ["", "## Warm-up batch norm (seed 0, source-only, validation split)", "",
                  *md.header(["batch norm in the warm-up", "val mIoU", "test mIoU", "note"], "lrrl")]
        for bn in WARMUP_BN[exp.model]:
            r = exp.warmup(bn)
            lines.append(f"| {bn} (lr {r.get('lr', '')}) | {100 * (r['val']['mIoU'] or 0):.1f} | "
                         f"{100 * (r['test']['mIoU'] or 0):.1f} | "
                         + (f"diverged: {r['diverged']} |" if r.get("diverged") else " |"))
    lines += _mt_sweep(exp)
    lines += _diagnostics(exp, seeds, choice)
    lines += _mt_diagnostics(exp, seeds, choice)
    lines += _inspected(exp, choice)
    if rows:
        try:
            from .plots import per_class_bars

            per_class_bars(list(class_means), {r["label"]: [means[i] for means in class_means.values()]
                                               for i, r in enumerate(rows)},
                           os.path.join(exp.out_dir, "per_class.png"), "test IoU per class, mean over seeds")
            lines += ["", "![per-class test IoU](per_class.png)"]
        except ImportError as exc:
            lines += ["", f"(per-class figure skipped: {exc})"]
    path = os.path.join(exp.out_dir, "report.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(exp.out_dir, "summary.json"),
                      json.dumps({"choice": choice, "seeds": list(seeds), "rows": table}, indent=1))
    return path


def _diagnostics(exp: Experiment, seeds: Sequence[int], choice: dict) -> List[str]:
    """What the adaptation runs logged (sdca.engine.steps diagnostics): the median over the run of each loss
    term's gradient at the features relative to CE's, the confident (Eq. 5) share, and the first and last L_feat."""
    import statistics

    rows = []
    for row in ("control", "sdca_paper", "sdca_public"):
        for seed in seeds:
            result = exp.result(exp.row_key(row, seed, choice))
            if result is None or "checkpoint" not in result:
                continue
            # The run folder of the checkpoint (seed 0's paper row reuses its sweep point's run).
            path = os.path.join(os.path.dirname(os.path.dirname(result["checkpoint"])), "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            records = [r for r in records if r.get("stage") == "adapt"] or records
            series = lambda key: [r[key] for r in records if isinstance(r.get(key), (int, float))]  # noqa: E731, B023
            med = lambda key: statistics.median(series(key)) if series(key) else float("nan")  # noqa: E731, B023
            confident = [statistics.fmean(v) for r in records
                         if (v := [x for k, x in r.items() if k.startswith("confident_")])]
            feat = series("loss_feat_src") or series("loss_feat")
            rows.append(f"| {row} | {seed} | {100 * med('gradshare_feat'):.2f}% | {100 * med('gradshare_out'):.2f}% | "
                        f"{100 * med('gradshare_lovasz'):.1f}% | "
                        f"{100 * statistics.median(confident) if confident else float('nan'):.1f}% | "
                        + (f"{feat[0]:.3f} -> {feat[-1]:.3f}" if feat else "n/a") + " |")
    if not rows:
        return []
    return ["", "## What the loss terms did (adaptation runs' logged diagnostics, medians over each run)", "",
            "Gradient share: the norm of a term's gradient at the backbone features (both domains), relative to the "
            "source CE term's. Confident: mean over classes of the share of a class's predicted target pixels that "
            "pass the Eq. 5 mask.", "",
            *md.header(["row", "seed", "L_feat share", "L_out share", "Lovász share", "confident",
                        "L_feat first -> last"], "lrrrrrl")] + rows


def _mean_iou(values) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return 100 * sum(kept) / len(kept) if kept else None


def _inspected(exp: Experiment, choice: dict) -> List[str]:
    """The seed-0 models of every row side by side, as `sdca inspect` measured them (validation split)."""
    from .inspect import compare_markdown

    results = {}
    for row, _, _ in ROWS:
        path = os.path.join(exp.out_dir, "inspect", row, "inspect.json")
        if os.path.isfile(path):
            results[row] = json.loads(Path(path).read_text())
    if not results:
        return []
    return ["", "## `sdca inspect` on the seed-0 models (source frames vs the labelled validation split)", "",
            "Rows whose checkpoint holds no semantic statistics (oracle, AdaBN, self-trained models) have no "
            "alignment figures; source-only is inspected through its init-stats checkpoint (same weights). "
            "Full reports: `inspect/<row>/inspect.md`.", ""] + compare_markdown(
        results, {row: f"inspect/{row}" for row in results})


RECIPES = ("sdca_paper", "sdca_public", "sdca_st") + MT_ROWS + ("mt_adabn",)
CONTROLS = ("source", "adabn", "control", "st_source")


def _goal(exp: Experiment, seeds: Sequence[int], choice: dict, table: Dict[str, dict]) -> List[str]:
    """The issue's goal, checked: the recipe with the best *validation* mean (test never chooses) against every
    control, by more than the larger seed standard deviation of the two, and the share of the source-only ->
    oracle gap it recovers on test."""
    if not all(k in table for k in CONTROLS + ("oracle",)):
        return []
    candidates = [r for r in RECIPES if r in table]
    if not candidates:
        return []

    def val_mean(row):
        return _mean_std([100 * (exp.result(exp.row_key(row, s, choice))["val"]["mIoU"] or 0.0) for s in seeds])[0]
    best = max(candidates, key=val_mean)
    b = table[best]
    gap = table["oracle"]["mean"] - table["source"]["mean"]
    recovered = (b["mean"] - table["source"]["mean"]) / gap if gap > 0 else float("nan")
    lines = ["", f"Best recipe on validation (mean over seeds): **{b['label']}** (val {val_mean(best):.1f}; test "
                 f"{b['mean']:.1f} ± {b['std']:.1f}); it recovers {100 * recovered:.0f}% of the {gap:.1f}-point gap "
                 "on test.", "", *md.header(["control", "test mean ± std", "best recipe minus control",
                                             "beats it by more than the larger std"], "lrrl")]
    beaten = []
    for row in CONTROLS:
        c = table[row]
        margin = b["mean"] - c["mean"]
        ok = margin > max(b["std"], c["std"])
        beaten.append(ok)
        lines.append(f"| {c['label']} | {c['mean']:.1f} ± {c['std']:.1f} | {margin:+.1f} | {'yes' if ok else 'no'} |")
    met = all(beaten) and recovered >= 1 / 3
    lines += ["", f"Goal (beat every control by more than the seed spread and recover at least a third of the gap): "
                  f"**{'met' if met else 'missed'}**."]
    rows = [r for r in MT_ROWS if r in table]
    if rows and gap > 0:
        lines += ["", "Gap recovered on test by each mean-teacher row: " + "; ".join(
            f"{table[r]['label']} {100 * (table[r]['mean'] - table['source']['mean']) / gap:.0f}%" for r in rows)
            + "."]
    return lines


def _mt_sweep(exp: Experiment) -> List[str]:
    lines = []
    for r in exp.results("mtsweep_"):
        m = r["mean_teacher"]
        contrast = "none" if m["contrast"] == "none" else f"{m['contrast']} (lambda {m['lambda_contrast']}, tau {m['tau']})"
        lines.append(f"| {m['alpha']} | {m['threshold']} | {contrast} | {100 * (r['val']['mIoU'] or 0):.1f} |")
    if not lines:
        return []
    chosen = exp.mt_choice(run=False)
    note = ("" if chosen is None else f" Chosen: alpha {chosen['mt']['alpha']}, threshold {chosen['mt']['thr']}; "
            f"contrast lambda {chosen['mt_proj']['lam']}, tau {chosen['mt_proj']['tau']} (the backbone row takes the "
            "same).")
    return ["", "## Mean-teacher validation sweep (seed 0, validation split)", "",
            "First alpha, then the confidence threshold at the best alpha (no contrast), then the contrastive term "
            "on the projection head." + note, "",
            *md.header(["alpha", "threshold", "contrast", "val mIoU"], "rrlr")] + lines


def _records(result: Optional[dict], stage: str) -> List[dict]:
    if not result or "checkpoint" not in result:
        return []
    path = os.path.join(os.path.dirname(os.path.dirname(result["checkpoint"])), "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if r.get("stage") == stage and "step" in r]


def _mt_diagnostics(exp: Experiment, seeds: Sequence[int], choice: dict) -> List[str]:
    """What the mean-teacher runs logged: each term's gradient share (median), the pseudo-weight and the
    teacher's accuracy on the weak target view at the first and last logged step, the precision of its confident
    pixels; then, for seed 0's plain mean teacher, each class's pseudo-label precision early and late."""
    import statistics

    from ..data.labels import CITYSCAPES

    rows = []
    for row in MT_ROWS:
        for seed in seeds:
            records = _records(exp.result(exp.row_key(row, seed, choice)), "mean-teacher")
            if not records:
                continue

            def series(key):
                return [r[key] for r in records if isinstance(r.get(key), (int, float))]  # noqa: B023 -- called in this iteration

            def med(key):
                v = series(key)
                return f"{100 * statistics.median(v):.2f}%" if v else "n/a"

            def ends(key):
                v = series(key)
                return f"{100 * v[0]:.1f} -> {100 * v[-1]:.1f}%" if v else "n/a"
            rows.append(f"| {row} | {seed} | {med('gradshare_mix')} | {med('gradshare_contrast')} | "
                        f"{ends('pseudo_weight')} | {ends('teacher_acc')} | {med('pseudo_precision')} |")
    if not rows:
        return []
    lines = ["", "## What the mean-teacher terms did (logged every log period, target labels read for monitoring "
                 "only)", "",
             "Gradient share: a term's gradient norm at the student's feature maps relative to the source CE's. "
             "Pseudo-weight: the share of target pixels the teacher is at least threshold-confident on. Teacher "
             "accuracy: its argmax against the target labels on the weak view. Precision: of its confident pixels.",
             "", *md.header(["row", "seed", "mix CE share", "contrast share", "pseudo-weight first -> last",
                             "teacher accuracy first -> last", "confident precision (median)"], "lrrrllr")]
    lines += rows
    records = _records(exp.result(exp.row_key("mt", seeds[0], choice)), "mean-teacher")
    if records:
        quarter = max(1, len(records) // 4)
        names = CITYSCAPES.class_names
        per_class = []
        for k, name in enumerate(names):
            early = [r[f"pseudo_precision_{k}"] for r in records[:quarter] if f"pseudo_precision_{k}" in r]
            late = [r[f"pseudo_precision_{k}"] for r in records[-quarter:] if f"pseudo_precision_{k}" in r]
            if early or late:
                fmt = lambda v: f"{100 * statistics.fmean(v):.0f}%" if v else "n/a"  # noqa: E731
                per_class.append(f"| {name} | {fmt(early)} | {fmt(late)} |")
        lines += ["", f"Pseudo-label precision per class, seed {seeds[0]}'s plain mean teacher (of the target pixels the "
                      "teacher labels as the class, the share that are; mean over the first and the last quarter of "
                      "the logged steps):", "", *md.header(["class", "first quarter", "last quarter"], "lrr")]
        lines += per_class
    return lines
