"""The command line: subcommands run and print JSON; errors are one clear line, not a traceback."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
from typer.testing import CliRunner

from app.cli import add_command_groups, app
from models.config import TINY
from models.dit import WanDiT
from models.loading import save_dit

runner = CliRunner()
add_command_groups(app)  # train / eval / bench come from their packages' entry points


def test_info_lists_presets():
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0, res.output
    assert "omniavatar-1.3b" in json.loads(res.output)["dit_presets"]


def test_inspect_reports_the_matching_preset(tmp_path):
    save_dit(WanDiT(TINY), tmp_path / "ck")
    res = runner.invoke(app, ["inspect", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["matches"][0]["preset"] == "tiny" and out["matches"][0]["exact"]


def test_inspect_missing_path_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["inspect", str(tmp_path / "absent")])
    assert res.exit_code != 0
    assert "not found" in str(res.exception) or "not found" in res.output


def test_bench_dit_prints_json():
    res = runner.invoke(app, ["bench", "dit", "--blocks", "12"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["cached_block_ms"]["blocks"] == 12 and out["forward_tokens_per_s"] > 0
    assert set(out["recompute_block_ms"]) == {"1", "5", "10", "20", "40"}


def test_console_script_turns_user_errors_into_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "app.cli", "inspect", str(tmp_path / "absent")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("avatarcast: error:") and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_runtime_cli_loads_training_and_benchmarks_only_as_entry_point_groups():
    import ast
    import subprocess
    import sys

    code = ("import sys, app.cli; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('training', 'benchmarks')]; "
            "app.cli.add_command_groups(app.cli.app); "
            "print(sorted(g.name for g in app.cli.app.registered_groups))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {"train", "eval", "bench"} <= set(ast.literal_eval(proc.stdout))
