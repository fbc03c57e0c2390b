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
    series = {"train loss": {"x": [0, 1, 2, 3], "y": [10.4, 7.0, float("nan"), 5.5], "xlabel": "step", "ylabel": "loss"},
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
            "with Stage('base_eval'):\n    raise UserError('no checkpoint in /x: run `python -m scripts.base_train` first')\n")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: no checkpoint in /x: run `python -m scripts.base_train` first"
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(NANOPIPE_DEBUG=1), capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_unknown_stage_name_rejected():
    with pytest.raises(ValueError):
        Stage("nope")
