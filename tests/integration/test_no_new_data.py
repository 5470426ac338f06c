"""An iteration whose teacher rows are all refused ends the run (NoNewData) instead of retraining on the
same data, and the user is told what the filter refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.tiny import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_a_round_with_no_kept_rows_stops_the_run_instead_of_retraining(tmp_path):
    # tiny-llama is an untrained model: its replies never parse, and maxOutputChars 1 refuses any that would.
    spec = tiny_spec(str(tmp_path / "runs"), loop={"maxIterations": 3, "stopWhen": {"noFailures": False}},
                     filters={"maxOutputChars": 1})
    spec["ray"] = {"launcher": "local"}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
                                        "metadata": {"name": "refused"}, "spec": spec}))
    cli = Path(sys.executable).with_name("llm2llm")
    out = subprocess.run([str(cli), "run", str(run_yaml)], cwd=REPO, capture_output=True, text=True, timeout=800)
    log = out.stdout[-5000:] + out.stderr[-5000:]
    assert out.returncode == 0, log
    status = json.loads((tmp_path / "runs/refused/status.json").read_text())
    assert status["phase"] == "Succeeded" and status["stopReason"] == "NoNewData", log
    [it] = status["iterations"]  # no second iteration on identical data, and one job only
    assert it["kept"] == 0 and it["generated"] > 0 and sum(it["rejected"].values()) == it["generated"]
    assert len(status["jobs"]) == 1
    assert not (tmp_path / "runs/refused/iter-1").exists()
    # The user reads why: the reasons with their counts, in status and in `llm2llm status`.
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Succeeded")
    for reason, count in it["rejected"].items():
        assert f"{reason} {count}" in message
    shown = subprocess.run([str(cli), "status", str(tmp_path / "runs/refused")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and message in shown.stdout, shown.stdout + shown.stderr
