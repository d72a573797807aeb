"""The pipeline's stages, each described once: the CLI's choices, config validation, the data check before a
run, the checkpoint a stage starts from and its seed all derive from these records."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # as typed: --stage NAME, `stages: [NAME]`, the run folder RUN/NAME
    key: str  # its config key where it has one: solver.KEY, data.stages.KEY
    starts_from: tuple[str, ...]  # the stage whose checkpoint it reads; adapt-bn: the newest of these that exists
    needs: frozenset[str]  # the data entries it reads besides data.val (source, target)
    seed_offset: int  # the stage's seed is cfg.seed + this (+ 1000 x rank), so results depend on the config only
    runs: str  # the Runner method that runs it
    trained: bool = False  # an optimised stage: has solver.KEY and data.stages.KEY
    default: bool = False  # in the default pipeline (the paper's five)
    keeps_best: bool = False  # writes best.pt, which solver.select=best makes the next stage start from


STAGE_LIST = (
    Stage("source", "source", (), frozenset({"source"}), 1, "run_source", trained=True, default=True,
          keeps_best=True),
    Stage("init-stats", "init_stats", ("source",), frozenset({"source"}), 2, "run_init_stats", default=True),
    Stage("adapt", "adapt", ("init-stats",), frozenset({"source", "target"}), 3, "run_adapt", trained=True,
          default=True, keeps_best=True),
    Stage("pseudo-label", "pseudo_label", ("adapt",), frozenset({"target"}), 4, "run_pseudo_label", default=True),
    Stage("self-train", "self_train", ("adapt",), frozenset({"target"}), 5, "run_self_train", trained=True,
          default=True),
    # AdaBN on the target frames, after whichever training stage ran last.
    Stage("adapt-bn", "adapt_bn", ("mean-teacher", "self-train", "adapt", "source"), frozenset({"target"}), 6,
          "run_adapt_bn"),
    # The one-stage adaptation of SDCA's successor (SePiCo), after source, instead of the four above.
    Stage("mean-teacher", "mean_teacher", ("source",), frozenset({"source", "target"}), 7, "run_mean_teacher",
          trained=True),
)
STAGE_BY_NAME = {s.name: s for s in STAGE_LIST}
STAGE_NAMES = tuple(s.name for s in STAGE_LIST)
DEFAULT_STAGES = tuple(s.name for s in STAGE_LIST if s.default)
OPTIONAL_STAGES = tuple(s.name for s in STAGE_LIST if not s.default)
TRAINED_STAGE_KEYS = tuple(s.key for s in STAGE_LIST if s.trained)
STAGE_SEEDS = {s.name: s.seed_offset for s in STAGE_LIST}


def stage(name: str) -> Stage:
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}") from None


def stages_needing(entry: str, stages) -> list[str]:
    """The stages among ``stages`` that read data entry ``entry`` (source | target | val: every stage)."""
    return [s for s in stages if entry == "val" or entry in stage(s).needs]
