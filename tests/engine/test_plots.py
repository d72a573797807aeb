"""Report figures: matplotlib draws them; without matplotlib a plot is a clear error, training is unaffected."""
import json
import subprocess
import sys

from PIL import Image

from sdca.engine.plots import plot_curves, read_curves


def metrics(path):
    lines = [{"stage": "source", "step": s, "loss_ce": 2.0 / s, "time": 0.1} for s in (1, 2, 3)]
    lines.append({"stage": "source", "step": 3, "eval": {"mIoU": 0.1}})
    lines += [{"stage": "adapt", "step": s, "loss_ce": 1.0, "loss_feat": 4.0, "gradshare_feat": 0.01 * s}
              for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_curves_put_the_stages_one_after_another(tmp_path):
    losses, shares, starts = read_curves(str(metrics(tmp_path / "m.jsonl")))
    assert losses["source / ce"] == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert losses["adapt / feat"] == [(4, 4.0), (5, 4.0)]  # after the 3 source steps; evaluations left out
    assert shares == {"adapt / feat": [(4, 0.01), (5, 0.02)]} and starts == [(0, "source"), (3, "adapt")]


def test_the_plot_is_a_png(tmp_path):
    out = tmp_path / "curves.png"
    plot_curves(str(metrics(tmp_path / "m.jsonl")), str(out))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 500  # two panels


def test_without_matplotlib_a_plot_names_what_to_install(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import sdca.engine, sdca.engine.runner  # the toolkit imports without it\n"
            "from sdca.engine.plots import plot_curves\n"
            f"plot_curves({str(metrics(tmp_path / 'm.jsonl'))!r}, {str(tmp_path / 'c.png')!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "pip install matplotlib" in run.stderr
