"""Stage mean-teacher end to end on the tiny scenes: exact resume, what its checkpoint holds, the projection
head absent from the export, the class-mixing size check, and the SePiCo presets against the recipe's facts."""
import json
import os
from pathlib import Path

import onnx
import pytest
import torch

from sdca.engine import Runner, load_config
from sdca.engine.loop import LRSchedule
from sdca.engine.recipe import format_recipe, stage_data
from sdca.models import read_checkpoint

FACTS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "sepico_recipe.json")


def mt_config(config, contrast="projection", **mt):
    return {**config, "stages": ["source", "mean-teacher"],
            "model": {**config["model"], "bn": "train"},
            "data": {**config["data"], "target": config["data"]["val"]},  # labelled: the monitoring reads them
            "solver": {**config["solver"], "mean_teacher": {"iters": 4, "lr": 0.002, "warmup_iters": 2,
                                                            "schedule_iters": 4}},
            "method": {**config["method"], "mean_teacher": {"contrast": contrast, "projection_dim": 8,
                                                            "alpha": 0.9, "threshold": 0.6, **mt}}}


def run(config, **changes):
    runner = Runner(load_config(None, [], **{**config, **changes}), progress=False)
    return runner, runner.train()


def test_resume_equals_uninterrupted_student_teacher_head_and_statistics(tiny_data):
    tmp, config = tiny_data
    base = mt_config(config)
    run(base, name="straight")
    short = dict(base, solver={**base["solver"], "mean_teacher": {**base["solver"]["mean_teacher"], "iters": 2}})
    run(short, name="resumed")
    folder = tmp / "runs" / "resumed" / "mean-teacher"
    os.remove(folder / "final.pt")  # as if killed right after the step-2 checkpoint
    assert read_checkpoint(str(folder / "last.pt"))["step"] == 2
    run(base, name="resumed")
    a = read_checkpoint(str(tmp / "runs" / "straight" / "mean-teacher" / "final.pt"))
    b = read_checkpoint(str(folder / "final.pt"))
    assert a["step"] == b["step"] == 4
    for key, value in a["model"]["state_dict"].items():
        torch.testing.assert_close(b["model"]["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert set(a["extra"]["modules"]) == {"teacher", "projection", "teacher_projection"}
    for name, state in a["extra"]["modules"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["extra"]["modules"][name][key], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{name}.{key}")
    for key in ("count", "mean", "covariance"):
        torch.testing.assert_close(b["statistics"]["projection"][key], a["statistics"]["projection"][key],
                                   rtol=1e-6, atol=1e-8)
    assert a["statistics"]["projection"]["mean"].shape == (19, 8)
    # The teacher trails the student: an average of its iterates, not a copy of the last one.
    student, teacher = a["model"]["state_dict"], a["extra"]["modules"]["teacher"]
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher if teacher[k].is_floating_point())
    records = [json.loads(line) for line in Path(tmp / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("stage") == "mean-teacher" and "loss_mix" in r]
    assert logged and all("gradshare_mix" in r and "teacher_acc" in r for r in logged)
    assert all(0 <= r["pseudo_weight"] <= 1 and 0 <= r["teacher_acc"] <= 1 for r in logged)


def test_the_projection_head_is_absent_from_the_export(tiny_data):
    from sdca.deploy.onnx_export import export_onnx

    tmp, config = tiny_data
    runner, _ = run(mt_config(config))
    graphs = {}
    for stage in ("source", "mean-teacher"):
        path = str(tmp / f"{stage}.onnx")
        export_onnx(runner.final_path(stage), path, parity_shapes=((1, 32, 64),))
        g = onnx.load(path).graph
        graphs[stage] = ([(n.op_type, tuple(n.input), tuple(n.output)) for n in g.node],
                         sorted((i.name, tuple(i.dims)) for i in g.initializer))
    assert graphs["source"] == graphs["mean-teacher"]  # the same network, other weights


def test_backbone_contrast_keeps_its_statistics_where_inspect_reads_them(tiny_data):
    tmp, config = tiny_data
    cfg = mt_config(config, contrast="backbone")
    # DAFormer's rare-class sampling of the source images, through the runner (class pixel counts cached).
    cfg["data"] = {**cfg["data"], "stages": {"mean_teacher": {"sampling": "rare_class", "rare_class_min_pixels": 10}}}
    runner, _ = run(cfg)
    ckpt = read_checkpoint(runner.final_path("mean-teacher"))
    assert set(ckpt["statistics"]) == {"features"} and set(ckpt["extra"]["modules"]) == {"teacher"}
    assert ckpt["statistics"]["features"]["mean"].shape[0] == 19
    assert float(ckpt["statistics"]["features"]["count"].sum()) > 0


def test_class_mix_needs_one_input_size(tiny_data):
    tmp, config = tiny_data
    cfg = mt_config(config)
    cfg["data"] = {**cfg["data"], "target_size": [48, 24]}
    run(cfg, stages=["source"])
    with pytest.raises(ValueError, match="data.stages.mean_teacher.crop"):
        run(cfg, stages=["mean-teacher"])


def test_lr_warm_up_follows_mmcv_linear_rule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hook = LRSchedule(opt, 6e-5, 40000, 1.0, warmup_iters=1500, warmup_ratio=1e-6)
    for it in (0, 1, 700, 1499, 1500, 20000, 39999):
        poly = (1 - it / 40000) ** 1.0
        k = (1 - it / 1500) * (1 - 1e-6) if it < 1500 else 0.0
        assert hook.factor(it) == pytest.approx(poly * (1 - k), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("preset", ["gta5_cityscapes_r101_mt", "synthia_cityscapes_r101_mt"])
def test_sepico_presets_resolve_to_the_recipe_facts(preset):
    facts = json.loads(Path(FACTS).read_text())
    cfg = load_config(preset)
    assert cfg.stages == ["source", "mean-teacher"]
    s, d, mt = cfg.solver.mean_teacher, stage_data(cfg, "mean_teacher"), cfg.method.mean_teacher
    o, sch = facts["optimizer"], facts["schedule"]
    assert (s.optimizer, s.lr, list(s.betas), s.weight_decay, cfg.solver.head_lr_mult) == (
        o["name"], o["lr"], o["betas"], o["weight_decay"], o["head_lr_mult"])
    assert (s.power, s.warmup_iters, s.warmup_ratio, s.iters) == (
        sch["power"], sch["warmup_iters"], sch["warmup_ratio"], sch["iters"])
    data = facts["data"]
    assert (d.batch_size, s.global_batch, list(d.crop)) == (data["batch"], data["batch"] * data["processes"],
                                                            data["crop"])
    assert (d.sampling, d.rare_class_temperature, d.rare_class_min_pixels) == (
        "rare_class", data["rare_class_temperature"], data["rare_class_min_pixels"])
    m = facts["mean_teacher"]
    assert (mt.alpha, mt.threshold, mt.ignore_top, mt.ignore_bottom, mt.class_mix) == (
        m["alpha"], m["threshold"], m["ignore_top"], m["ignore_bottom"], m["class_mix"])
    c = facts["contrast"]
    assert (mt.contrast, mt.projection_dim, mt.projection_hidden, mt.tau, mt.lambda_contrast, mt.contrast_start,
            mt.label_ratio) == (c["features"], c["projection_dim"], c["projection_hidden"], c["tau"], c["lambda"],
                                c["start"], c["label_ratio"])
    table = format_recipe(cfg, 1)
    assert "mean-teacher" in table and "AdamW (0.9, 0.999), wd 0.01, head x10, poly 1, warm-up 1500" in table
    assert "adapt" not in table.splitlines()[1]  # the paper's later stages are not part of this recipe


def test_cli_prints_the_mean_teacher_recipe_and_offers_the_stage():
    from click.testing import CliRunner

    from sdca.cli import main

    result = CliRunner().invoke(main, ["train", "gta5_cityscapes_r101_mt", "--print-recipe"])
    assert result.exit_code == 0, result.output
    assert "source 1280x720, target 1280x640" in result.output and "frozen (teacher too)" in result.output
    assert "rare_class" in result.output and "ClassMix, strong" in result.output
    result = CliRunner().invoke(main, ["train", "--help"])
    assert "mean-teacher" in result.output
