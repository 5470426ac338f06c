"""The examples a user starts from: every run.yaml is valid, and every committed data file is what its
make_data.py writes (one source per generated file)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from llm2llm.spec import parse_run

REPO = Path(__file__).resolve().parents[2]
GENERATORS = sorted(REPO.glob("examples/*/make_data.py"))
RUNS = sorted(p for p in REPO.glob("examples/*/run.yaml"))


@pytest.mark.parametrize("script", GENERATORS, ids=lambda p: p.parent.name)
def test_committed_data_is_what_the_generator_writes(script: Path, tmp_path: Path) -> None:
    copy = tmp_path / script.name
    shutil.copy(script, copy)
    subprocess.run([sys.executable, str(copy)], check=True, cwd=tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written, f"{script} wrote no .jsonl file"
    for name in written:
        assert (tmp_path / name).read_bytes() == (script.parent / name).read_bytes(), (
            f"examples/{script.parent.name}/{name} differs from what make_data.py writes: run it and commit")


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.parent.name)
def test_example_run_is_valid(path: Path) -> None:
    """Each AugmentationRun of the file (examples/cluster/run.yaml also holds the Secrets it references)."""
    runs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "AugmentationRun"]
    assert runs, f"{path} holds no AugmentationRun"
    for doc in runs:
        parse_run(doc, str(path))


def test_reviews_test_set_is_held_out_and_balanced() -> None:
    """The method benchmark's task: no test text among the seed rows, both labels in every kind."""
    rows = {name: [json.loads(line) for line in (REPO / f"examples/reviews/{name}.jsonl").read_text().splitlines()]
            for name in ("seed", "test")}
    assert len(rows["seed"]) == 200 and len(rows["test"]) == 300
    assert not {r["text"] for r in rows["seed"]} & {r["text"] for r in rows["test"]}
    for name, rs in rows.items():
        for kind in ("plain", "negated", "contrast"):
            labels = [r["label"] for r in rs if r["kind"] == kind]
            assert abs(labels.count("positive") - labels.count("negative")) <= 1, (name, kind)
