import math
import xml.etree.ElementTree as ET

import pytest

from tunesmith.charts import Line, Panel, ticks, write_svg
from tunesmith.training.logging import plot_loss

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (0, 1),
        (2.31, 7.9),
        (-3, 250),
        (1e-4, 3e-4),
        (5, 5),
        (0, 0),
        (1.0, 1 + 2e-16),
        (1e-13, 1e-13),
        (0, 1e-17),
    ],
)
def test_ticks_are_round_evenly_spaced_and_cover_the_range(lo, hi):
    t = ticks(lo, hi)
    assert 2 <= len(t) <= 12 and t[0] <= lo and t[-1] >= hi
    steps = [b - a for a, b in zip(t, t[1:])]
    step = steps[0]
    assert step > 0 and all(math.isclose(s, step, rel_tol=1e-6) for s in steps)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 5))


def test_loss_chart_is_valid_svg_with_every_point(tmp_path):
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 31)]
    records += [{"step": 10, "eval_loss": 0.5}, {"step": 30, "eval_loss": 0.2}]
    path = tmp_path / "loss.svg"
    plot_loss(records, path, title="sft / lora on <tiny> & co")
    root = ET.parse(path).getroot()  # escapes the title: parses as XML
    lines = root.findall(f"{SVG}polyline")
    # raw loss, its moving average, eval loss
    assert [len(p.get("points").split()) for p in lines] == [30, 30, 2]
    assert len(root.findall(f"{SVG}circle")) == 2
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "sft / lora on <tiny> & co" in texts and "eval loss" in texts


def test_bars_and_grid_of_panels(tmp_path):
    panels = [Panel("acc", bars={"full": 0.9, "lora": 0.8}), Panel("speed", bars={"a": 3, "b": 1})]
    panels.append(Panel("kl", [Line("kl", [1, 2, 3], [0.1, float("nan"), 0.3])]))
    root = ET.parse(write_svg(tmp_path / "c.svg", panels, columns=2)).getroot()
    assert root.get("width") == str(2 * 360) and root.get("height") == str(2 * 240)
    assert len(root.findall(f"{SVG}polyline")[0].get("points").split()) == 2  # NaN left out
    heights = [
        float(r.get("height")) for r in root.findall(f"{SVG}rect")[1:] if r.get("fill") != "none"
    ]
    assert heights[0] > heights[1] > 0  # 0.9 drawn taller than 0.8


def test_a_diverged_run_gets_no_bar_and_the_chart_still_draws(tmp_path):
    panels = [Panel("eval loss", bars={"full": 0.4, "lora": float("nan"), "prompt": float("inf")})]
    root = ET.parse(write_svg(tmp_path / "c.svg", panels)).getroot()
    drawn = [r for r in root.findall(f"{SVG}rect") if r.get("fill") not in ("none", "white")]
    assert len(drawn) == 1
    assert [t.text for t in root.iter(f"{SVG}text")].count("n/a") == 2


def test_control_characters_are_left_out_of_the_svg(tmp_path):
    path = tmp_path / "loss.svg"
    plot_loss([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], path, title="run\x01\x1b[31m")
    assert "run[31m" in [t.text for t in ET.parse(path).getroot().iter(f"{SVG}text")]
