import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from argparse import Namespace

import pytest

from nanopipe import report
from nanopipe.stage import Stage

from .conftest import subprocess_env


def test_generate_on_empty_folder_names_missing_stages(tmp_path, capsys):
    out = report.generate()
    text = out.read_text()
    assert "## Summary" in text
    assert "| val bpb | — | — |" in text
    assert "Stages not run (yet): tok_train" in text
    assert "missing stages: tok_train" in capsys.readouterr().out


def test_cli_generate_in_subprocess(tmp_path):
    env = subprocess_env(NANOPIPE_REPORT_DIR=tmp_path / "rep")
    for cmd in ("reset", "generate"):
        r = subprocess.run([sys.executable, "-m", "nanopipe.report", cmd], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "report.md").exists()
    assert (tmp_path / "rep" / "run.json").exists()


def test_partial_report_with_series_makes_valid_svg(tmp_path):
    series = {"train loss": {"x": [0, 1, 2, 3], "y": [10.4, 7.0, float("nan"), 5.5], "xlabel": "step",
                             "ylabel": "loss"},
              "val loss": {"x": [0, 3], "y": [10.3, 5.9], "xlabel": "step", "ylabel": "loss"}}
    report.write_section("base_train", "Trained.", {"val_bpb": 1.2345, "mfu": None, "tok_per_sec": 1234.6},
                         series=series, seconds=125.0, command="python -m scripts.base_train --depth 4")
    report.write_section("chat_eval_sft", "Evaluated.", {"chatcore": 0.25, "tasks": {"GSM8K": {"accuracy": 0.5}}},
                         seconds=10.0)
    out = report.generate(dollars_per_hour=3.0)
    text = out.read_text()
    assert "| val bpb | 1.2345 | — |" in text
    assert "| GSM8K | — | 0.5000 |" in text
    assert "| ChatCORE | — | 0.2500 |" in text
    assert "| MFU % | — | — |" in text           # unknown peak stays blank, never faked
    assert "| tok/s (training) | 1235 | — |" in text
    assert "**2m15s**" in text
    assert "Estimated cost: $0.11" in text
    assert "Trained." in text and "python -m scripts.base_train --depth 4" in text
    svgs = list((out.parent / "plots").glob("*.svg"))
    assert len(svgs) == 1                        # both loss series share one plot
    root = ET.fromstring(svgs[0].read_text())
    assert root.tag.endswith("svg")
    assert len([el for el in root.iter() if el.tag.endswith("polyline")]) == 2


def test_core_label_partial():
    assert report.core_label({"core_tasks": 20, "core_tasks_total": 22}) == "CORE (20/22)"
    assert report.core_label({"core_tasks": 22, "core_tasks_total": 22}) == "CORE"


def test_corrupt_section_json_is_skipped(tmp_path):
    report.write_section("tok_train", "ok", {"vocab_size": 512})
    (report.report_dir() / "sections" / "03-base_train.json").write_text("{not json")
    assert set(report.read_sections()) == {"tok_train"}


def test_reset_removes_old_sections():
    report.write_section("tok_train", "ok", {})
    report.reset()
    assert report.read_sections() == {}


def test_stage_writes_section_with_timing_and_config():
    with Stage("tok_eval", Namespace(vocab_size=512)) as stage:
        stage.report("table", {"bytes_per_token": 3.5})
    record = report.read_sections()["tok_eval"]
    assert record["data"] == {"bytes_per_token": 3.5}
    assert record["config"] == {"vocab_size": 512}
    assert record["seconds"] >= 0


def test_stage_user_error_is_one_line_exit_2(tmp_path):
    code = ("from nanopipe.stage import Stage\nfrom nanopipe.common import UserError\n"
            "with Stage('base_eval'):\n"
            "    raise UserError('no checkpoint in /x: run `python -m scripts.base_train` first')\n")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: no checkpoint in /x: run `python -m scripts.base_train` first"
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(NANOPIPE_DEBUG=1), capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_unknown_stage_name_rejected():
    with pytest.raises(ValueError):
        Stage("nope")


def _svg(path):
    root = ET.fromstring(path.read_text())
    texts = {el.text: el for el in root.iter() if el.tag.endswith("text") and el.text}
    return root, texts


def test_plots_are_readable(tmp_path):
    """Log-scale loss axis when losses span orders of magnitude, markers on sparse evals, the legend beside the
    plot area, units on the axes, and one plot overlaying train loss and val bpb on two axes."""
    steps = list(range(1, 201))
    loss = [10.0 * 0.97 ** s + 0.3 for s in steps]  # 10.3 down to 0.3: more than a factor of 10
    evals = [25, 50, 100, 150, 200]
    series = {"train_loss": {"x": steps, "y": loss, "xlabel": "optimizer step", "ylabel": "train loss (nats/token)"},
              "val_bpb": {"x": evals, "y": [1.5, 1.1, 0.8, 0.7, 0.65], "xlabel": "optimizer step",
                          "ylabel": "val bpb (bits/byte)"}}
    report.write_section("base_train", "Trained.", {}, series=series)
    out = report.generate()
    plots = out.parent / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [
        "base_train-overlay.svg", "base_train-train_loss__nats_token_.svg", "base_train-val_bpb__bits_byte_.svg"]
    assert "![Base model training: train loss (nats/token) and val bpb (bits/byte)](plots/base_train-overlay.svg)" \
        in out.read_text()

    root, texts = _svg(plots / "base_train-train_loss__nats_token_.svg")
    assert "train loss (nats/token) (log scale)" in texts and "optimizer step" in texts
    y = {v: float(texts[v].get("y")) for v in ("0.5", "1", "5")}
    # log scale: distances go by ratios, so 0.5 -> 1 and 1 -> 5 are log10(2) : log10(5) apart
    ratio = (y["0.5"] - y["1"]) / (y["1"] - y["5"])
    assert abs(ratio - math.log10(2) / math.log10(5)) < 0.02
    assert not [el for el in root.iter() if el.tag.endswith("circle")]  # 200 points: a line, no markers
    frame = next(el for el in root.iter() if el.tag.endswith("rect") and el.get("fill") == "none")
    plot_right = float(frame.get("x")) + float(frame.get("width"))
    assert float(texts["train_loss"].get("x")) > plot_right  # the legend is beside the data, not on it

    root, texts = _svg(plots / "base_train-val_bpb__bits_byte_.svg")
    assert "val bpb (bits/byte)" in texts  # 1.5 / 0.65 < 10: linear
    assert len([el for el in root.iter() if el.tag.endswith("circle")]) == len(evals)  # a marker per eval

    root, texts = _svg(plots / "base_train-overlay.svg")
    assert "train loss (nats/token) (log scale)" in texts and "val bpb (bits/byte)" in texts
    assert "val_bpb (right axis)" in texts
    assert len([el for el in root.iter() if el.tag.endswith("polyline")]) == 2
    right_ticks = [el for el in root.iter() if el.tag.endswith("text") and el.get("text-anchor") == "start"]
    assert right_ticks and all(float(el.get("x")) > plot_right - 200 for el in right_ticks)
