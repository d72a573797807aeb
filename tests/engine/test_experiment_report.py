"""The experiment's report aggregates per-seed results correctly (mean, sample std, gap recovery, sweep table)."""
import json
from pathlib import Path

import numpy as np
import pytest

from sdca.engine.experiment import ROWS, Experiment, write_report


def test_report_means_spreads_and_recovery(tmp_path):
    exp = Experiment(str(tmp_path / "experiment"), quick=True)
    rng = np.random.default_rng(0)
    choice = {"bn": "target", "lam": 0.1, "tau": 0.5, "cb": True}
    truth = {}
    for row, _, _ in ROWS:
        truth[row] = rng.uniform(0.1, 0.4, 3)
        for seed, value in enumerate(truth[row]):
            iou = {"road": value, "car": None}
            exp._save(exp.row_key(row, seed, choice), {"val": {"mIoU": value, "IoU": iou}, "test": {"mIoU": value, "IoU": iou}})
    exp._save("sweep_bn-train_lam-0.1_tau-0.5", {"val": {"mIoU": 0.2}, "test": {"mIoU": 0.1},
                                                  "method": {"adapt_bn": "train", "lambda_feat": 0.1, "tau": 0.5}})
    path = write_report(exp, [0, 1, 2], choice)
    summary = json.loads((tmp_path / "experiment" / "summary.json").read_text())
    for row, _, _ in ROWS:
        got = summary["rows"][row]
        assert got["mean"] == pytest.approx(100 * truth[row].mean())
        assert got["std"] == pytest.approx(100 * truth[row].std(ddof=1))
    text = Path(path).read_text()
    gap = truth["oracle"].mean() - truth["source"].mean()
    recovered = (truth["sdca_st"].mean() - truth["source"].mean()) / gap
    assert f"recovers {100 * recovered:.0f}%" in text
    assert "adapt_bn=target" in text and "class-balanced" in text and "| train | 0.1 | 0.5 | Eq. 5 | 20.0 |" in text
    assert exp.row_key("control", 1, choice) == "s1_control_bn-target_lam-0.0_tau-0.5"  # one control per BN mode
    # Per-class table: each row's IoU averaged over seeds; a class no seed of any row scored is left out.
    road = next(line for line in text.splitlines() if line.startswith("| road |"))
    cells = [float(c) for c in road.strip(" |").split("|")[1:]]
    assert cells == pytest.approx([100 * truth[row].mean() for row, _, _ in ROWS], abs=0.051)
    assert "| car |" not in text


def test_missing_seeds_leave_a_row_out(tmp_path):
    exp = Experiment(str(tmp_path / "experiment"), quick=True)
    for seed in (0, 1):
        exp._save(f"s{seed}_source", {"val": {"mIoU": 0.2, "IoU": {}}, "test": {"mIoU": 0.2, "IoU": {}}})
    write_report(exp, [0, 1, 2], {"bn": "train", "lam": 0.1, "tau": 0.5})
    assert json.loads((tmp_path / "experiment" / "summary.json").read_text())["rows"] == {}


def test_lite0_report_warmup_choice_diagnostics_and_figure(tmp_path):
    from PIL import Image

    exp = Experiment(str(tmp_path / "experiment"), quick=True, model="lite0")
    choice = {"bn": "train", "lam": 0.1, "tau": 0.5}
    ok = {"val": {"mIoU": 0.2, "IoU": {"road": 0.5, "car": 0.1}}, "test": {"mIoU": 0.25, "IoU": {"road": 0.5, "car": 0.1}}}
    for row, _, _ in ROWS:
        key = exp.row_key(row, 0, choice)
        exp._save(key, dict(ok, checkpoint=str(tmp_path / "experiment" / key / "adapt" / "final.pt")))
    exp._save("s0_source", dict(ok, bn="train", lr=0.01))  # the warm-up candidate is seed 0's source-only
    exp._save("s0_source_bn-frozen", {"val": {"mIoU": 0.0, "IoU": {}}, "test": {"mIoU": 0.0, "IoU": {}},
                                      "diverged": "loss term loss_ce is inf", "bn": "frozen", "lr": 0.005})
    assert exp.warmup_bn() == "train"  # chosen on validation mIoU
    # An adaptation run's logged diagnostics: medians of the gradient shares, first and last L_feat.
    run = tmp_path / "experiment" / exp.row_key("sdca_paper", 0, choice)
    run.mkdir(parents=True)
    records = [{"stage": "adapt", "step": i, "loss_ce": 1.0, "loss_feat": 5.0 - i, "gradshare_feat": share,
                "gradshare_out": 0.01, "gradshare_lovasz": 0.3, "confident_0": 0.5, "confident_1": 0.7}
               for i, share in enumerate([0.01, 0.03, 0.02])]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    text = Path(write_report(exp, [0], choice)).read_text()
    assert "384x192; deeplabv2_lite0" in text and "batch norm train in the warm-up" in text
    assert "| frozen (lr 0.005) | 0.0 | 0.0 | diverged: loss term loss_ce is inf |" in text
    assert "| train (lr 0.01) | 20.0 | 25.0 |  |" in text
    assert "| sdca_paper | 0 | 2.00% | 1.00% | 30.0% | 60.0% | 5.000 -> 3.000 |" in text
    with Image.open(tmp_path / "experiment" / "per_class.png") as im:
        assert im.format == "PNG"


def test_report_goal_picks_the_recipe_on_validation_and_checks_every_control(tmp_path):
    """The goal line: the recipe with the best *validation* mean is checked against each control by more than the
    larger seed std; the mean-teacher sweep table lists every point and the choice."""
    from sdca.engine.experiment import MT_ROWS

    exp = Experiment(str(tmp_path / "experiment"), quick=True)
    choice = {"bn": "target", "lam": 0.1, "tau": 0.5}
    # The mean-teacher sweep: alpha 0.999 best, then threshold 0.9 worse, then contrast (1, 100) best.
    sweep = {"a-0.99_thr-0.968": 0.20, "a-0.9_thr-0.968": 0.24, "a-0.999_thr-0.968": 0.25, "a-0.999_thr-0.9": 0.22,
             "a-0.999_thr-0.968_projection_lam-1.0_tau-100.0": 0.26, "a-0.999_thr-0.968_projection_lam-0.1_tau-0.5": 0.21}
    for tag, v in sweep.items():
        alpha, thr = float(tag.split("_")[0][2:]), float(tag.split("_")[1][4:])
        contrast = "projection" if "projection" in tag else "none"
        lam, tau = (1.0, 100.0) if "tau-100" in tag else (0.1, 0.5)
        exp._save("mtsweep_" + tag, {"val": {"mIoU": v, "IoU": {}}, "test": {"mIoU": v, "IoU": {}},
                                     "mean_teacher": {"alpha": alpha, "threshold": thr, "contrast": contrast,
                                                      "lambda_contrast": lam if contrast != "none" else 0.0,
                                                      "tau": tau}})
    chosen = exp.mt_choice(run=False)
    assert chosen["mt"] == {"alpha": 0.999, "thr": 0.968}
    assert chosen["mt_proj"]["lam"] == 1.0 and chosen["mt_proj"]["tau"] == 100.0
    assert chosen["mt_backbone"]["contrast"] == "backbone" and chosen["mt_nomix"]["nomix"]
    test = {"source": [15, 16, 17], "oracle": [30, 31, 32], "adabn": [16, 17, 18], "control": [16, 18, 17],
            "st_source": [14, 15, 16], "sdca_paper": [17, 17, 18], "sdca_public": [17, 17, 17],
            "sdca_st": [15, 15, 15], "mt": [21, 22, 23], "mt_proj": [24, 24, 24], "mt_backbone": [20, 21, 22],
            "mt_nomix": [18, 19, 20]}
    val = dict(test, mt_proj=[10, 10, 10])  # best on test, worst on validation: it must not be chosen
    for row, values in test.items():
        for seed in range(3):
            exp._save(exp.row_key(row, seed, choice), {"val": {"mIoU": val[row][seed] / 100, "IoU": {}},
                                                       "test": {"mIoU": values[seed] / 100, "IoU": {}}})
    text = Path(write_report(exp, [0, 1, 2], choice)).read_text()
    assert "Best recipe on validation (mean over seeds): **mean teacher (ClassMix, no contrast)**" in text
    gap = 31 - 16
    assert f"recovers {100 * (22 - 16) / gap:.0f}% of the {gap:.1f}-point gap" in text
    # mt 22 ± 1 vs AdaBN 17 ± 1: +5.0 > 1, yes; every control is beaten, 40 % >= a third: met.
    assert "| AdaBN (source-only, target BN statistics) | 17.0 ± 1.0 | +5.0 | yes |" in text
    assert "**met**" in text
    assert "| 0.999 | 0.9 | none | 22.0 |" in text and "| 0.999 | 0.968 | projection (lambda 1.0, tau 100.0) | 26.0 |" in text
    assert set(MT_ROWS) <= {row for row, _, _ in ROWS}
    # AdaBN as good as the best recipe, with a wider spread: not beaten, so the goal is missed.
    for seed, value in enumerate([20, 22, 24]):
        exp._save(exp.row_key("adabn", seed, choice), {"val": {"mIoU": 0.1, "IoU": {}},
                                                       "test": {"mIoU": value / 100, "IoU": {}}})
    text = Path(write_report(exp, [0, 1, 2], choice)).read_text()
    assert "| AdaBN (source-only, target BN statistics) | 22.0 ± 2.0 | +0.0 | no |" in text
    assert "**missed**" in text


def test_mean_teacher_only_with_the_sweep_runs_it_before_the_rows_and_uses_its_choice(tmp_path, monkeypatch):
    """--mean-teacher-only --sweep-mean-teacher: the sweep points (alpha, then the threshold at the best alpha,
    then the contrast at the best of those) run before any mean-teacher row, and the rows take its choice."""
    import sdca.engine.experiment as experiment

    out = str(tmp_path / "experiment")
    val = {"a-0.99_thr-0.968": 0.20, "a-0.9_thr-0.968": 0.22, "a-0.999_thr-0.968": 0.25, "a-0.999_thr-0.9": 0.27,
           "a-0.999_thr-0.9_projection_lam-1.0_tau-100.0": 0.21, "a-0.999_thr-0.9_projection_lam-0.1_tau-0.5": 0.30}
    calls = []

    def fake_task(out_dir, quick, model, threads, name, args, mt_sweep=True):
        exp = Experiment(out_dir, quick=quick, model=model, mt_sweep=mt_sweep)
        calls.append((name, args))
        if name == "mt_sweep_point":
            tag = exp.mt_tag(args[0])
            p = args[0]
            exp._save("mtsweep_" + tag, {"val": {"mIoU": val[tag], "IoU": {}}, "test": {"mIoU": 0.1, "IoU": {}},
                                         "mean_teacher": {"alpha": p["alpha"], "threshold": p["thr"],
                                                          "contrast": p.get("contrast", "none"),
                                                          "lambda_contrast": p.get("lam", 0.0),
                                                          "tau": p.get("tau", 100.0)}})
        if name == "adapted" and args[0] in experiment.MT_ROWS:
            exp._save(exp.row_key(args[0], args[1], args[2]), {"val": {"mIoU": 0.1, "IoU": {}},
                                                               "test": {"mIoU": 0.1, "IoU": {}}})

    monkeypatch.setattr(experiment, "_task", fake_task)
    exp = Experiment(out, quick=True, mt_sweep=True)
    exp._save("s0_source", {"val": {"mIoU": 0.1, "IoU": {}}, "test": {"mIoU": 0.1, "IoU": {}}, "checkpoint": "x.pt"})
    experiment.run_experiment(out, seeds=(0, 1), quick=True, mean_teacher_only=True, sweep_mean_teacher=True,
                              log=lambda m: None)
    sweep = [exp.mt_tag(a[0]) for n, a in calls if n == "mt_sweep_point"]
    assert sweep == ["a-0.999_thr-0.968", "a-0.99_thr-0.968", "a-0.9_thr-0.968", "a-0.999_thr-0.9",
                     "a-0.999_thr-0.9_projection_lam-1.0_tau-100.0", "a-0.999_thr-0.9_projection_lam-0.1_tau-0.5"]
    first_row = next(i for i, (n, a) in enumerate(calls) if n == "adapted" and a[0] in experiment.MT_ROWS)
    assert max(i for i, (n, _) in enumerate(calls) if n == "mt_sweep_point") < first_row
    assert exp.row_key("mt", 1, {}) == "s1_mt_a-0.999_thr-0.9"
    assert exp.row_key("mt_backbone", 1, {}) == "s1_mt_backbone_a-0.999_thr-0.9_backbone_lam-0.1_tau-0.5"
    for row in experiment.MT_ROWS:  # every row and seed ran at the chosen setting
        for seed in (0, 1):
            assert exp.result(exp.row_key(row, seed, {})) is not None, (row, seed)
    # Without the sweep the rows take the recipe's defaults.
    assert Experiment(out, quick=True, mt_sweep=False).row_key("mt", 1, {}) == "s1_mt_a-0.999_thr-0.968"


def test_a_tied_mean_teacher_sweep_keeps_the_recipe_default(tmp_path):
    """In a 100-step run the alpha ramp barely reaches 0.99 and never 0.999, so those points can tie on
    validation; the tie must go to the recipe's default (0.999)."""
    from sdca.engine.experiment import MT_DEFAULT

    exp = Experiment(str(tmp_path / "experiment"), quick=True)
    for p in exp.mt_sweep_alpha():
        exp._save("mtsweep_" + exp.mt_tag(p), {"val": {"mIoU": 0.15, "IoU": {}}, "test": {"mIoU": 0.15, "IoU": {}}})
    thresholds = exp.mt_sweep_threshold(run=False)
    assert thresholds and all(p["alpha"] == MT_DEFAULT["alpha"] for p in thresholds)


def test_mean_teacher_only_report_claims_no_sweep_it_did_not_run_and_writes_mt_diagnostics(tmp_path):
    """Without SDCA sweep points the report says the control's setting is the earlier choice (it was not chosen
    in this run) and prints no empty sweep table; the mean-teacher diagnostics are medians and first -> last
    values, and a term the run did not log reads "n/a", not "n/a%"."""
    exp = Experiment(str(tmp_path / "experiment"), quick=True, mt_sweep=False)
    choice = {"bn": "target", "lam": 0.1, "tau": 0.5}
    ok = {"val": {"mIoU": 0.2, "IoU": {"road": 0.5}}, "test": {"mIoU": 0.2, "IoU": {"road": 0.5}}}
    for row in ("source", "oracle", "adabn", "st_source", "control"):
        exp._save(exp.row_key(row, 0, choice), ok)
    run = tmp_path / "experiment" / exp.row_key("mt", 0, choice)
    exp._save(exp.row_key("mt", 0, choice), dict(ok, checkpoint=str(run / "mean-teacher" / "final.pt")))
    run.mkdir(parents=True)
    mix, weight, acc = [0.7, 0.9, 0.8, 0.75], [0.40, 0.45, 0.50, 0.52], [0.6, 0.62, 0.65, 0.7]
    records = [{"stage": "mean-teacher", "step": i, "gradshare_mix": m, "pseudo_weight": w, "teacher_acc": a,
                "pseudo_precision": 0.9} for i, (m, w, a) in enumerate(zip(mix, weight, acc))]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    text = Path(write_report(exp, [0], choice)).read_text()
    assert "No SDCA sweep in this run" in text and "adapt_bn=target" in text
    assert "Chosen on the validation split (seed 0): adapt_bn" not in text
    assert "## Validation sweep (seed 0, validation split)" not in text
    expected = (f"| mt | 0 | {100 * np.median(mix):.2f}% | n/a | {100 * weight[0]:.1f} -> {100 * weight[-1]:.1f}% | "
                f"{100 * acc[0]:.1f} -> {100 * acc[-1]:.1f}% | 90.00% |")
    assert expected in text
    assert "n/a%" not in text
