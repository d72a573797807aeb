"""The stage records and the config's types: what derives from them agrees with the code that runs."""
import dataclasses
import warnings

import pytest

from sdca.data.kinds import DATASET_KINDS
from sdca.engine.builders import BUILDERS
from sdca.engine.config import ConfigError, SolverConfig, StagesData, load_config
from sdca.engine.data_specs import missing_data
from sdca.engine.runner import Runner
from sdca.engine.stages import STAGE_LIST, STAGE_NAMES, stage


def test_every_stage_record_names_a_runner_method_and_known_stages():
    for s in STAGE_LIST:
        assert callable(getattr(Runner, s.runs)), s.name
        assert all(start in STAGE_NAMES for start in s.starts_from), s.name
        assert s.needs <= {"source", "target"}
    assert len({s.seed_offset for s in STAGE_LIST}) == len(STAGE_LIST)  # each stage draws its own seed


def test_trained_stages_are_exactly_those_with_a_solver_and_stage_data():
    solvers = {f.name for f in dataclasses.fields(SolverConfig) if "StageSolver" in str(f.type)}
    data = {f.name for f in dataclasses.fields(StagesData)}
    trained = {s.key for s in STAGE_LIST if s.trained}
    assert trained == solvers == data


def test_data_kinds_and_builders_agree_and_every_kind_is_a_config_choice():
    assert set(BUILDERS) == set(DATASET_KINDS)
    for kind in DATASET_KINDS:
        load_config(None, [f"data.val={{kind: {kind}, root: r}}"])


@pytest.mark.parametrize("override,key", [("data.val={kind: gtx, root: r}", "data.val.kind"),
                                          ("model.bn=batch", "model.bn"),
                                          ("solver.mean_teacher.optimizer=adam", "solver.mean_teacher.optimizer"),
                                          ("amp=fp8", "amp")])
def test_a_value_outside_its_choices_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key} must be one of"):
        load_config(None, [override])


def test_the_old_batch_norm_key_is_read_with_a_warning_and_not_together_with_the_new_one():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(None, ["method.adapt_bn=target"])
    assert cfg.method.adaptation_bn == "target" == cfg.method.adapt_bn
    assert any("method.adaptation_bn" in str(w.message) for w in caught)
    with pytest.raises(ConfigError, match="old name"):
        load_config(None, ["method.adapt_bn=target", "method.adaptation_bn=train"])


def test_the_data_check_follows_what_each_stage_reads(tmp_path):
    cfg = load_config(None, [f"data.source={{kind: images, root: {tmp_path / 'nope-src'}}}",
                             f"data.target={{kind: images, root: {tmp_path / 'nope-tgt'}}}"])
    for name in STAGE_NAMES:
        cfg.stages = [name]
        missing = missing_data(cfg)
        expected = [f"data.{e}.root = {tmp_path / ('nope-src' if e == 'source' else 'nope-tgt')}"
                    for e in ("source", "target") if e in stage(name).needs]
        assert missing == expected, name


def test_a_plan_reads_the_old_dict_form_and_gives_the_same_config(tmp_path):
    from sdca.engine.demo import synthdrive_config
    from sdca.engine.plan import Plan

    old = {"frames": (30, 20, 10), "iters": (8, 4, 2), "batch": 2}
    plan = Plan.of(old)
    assert (plan.source_frames, plan.target_frames, plan.val_frames, plan.batch) == (30, 20, 10, 2)
    assert plan.mt_iters == 4 + 2  # the mean teacher takes the two stages' budget it replaces
    assert Plan.of(plan.to_dict()) == Plan(30, 20, 10, 8, 4, 2, 2, 6)
    assert plan.scaled(10).to_dict()["iters"] == [80, 40, 20] and plan.scaled(10).mt_iters == 60
    a = synthdrive_config(str(tmp_path / "r"), old, 0, str(tmp_path / "c"))
    b = synthdrive_config(str(tmp_path / "r"), plan, 0, str(tmp_path / "c"))
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert (a.solver.source.iters, a.solver.mean_teacher.iters, a.data.batch_size) == (8, 6, 2)
