"""What the iteration job's driver hands its workers, which may run on other machines (KubeRay pods): model
names and storage locations, never a path on the driver's own disk.

The job is the real ``Iteration`` with training and the fanned-out calls faked (as in
test_reliability_storage.py); the output is a local folder (a shared volume) or ``memory://`` (an object
store: not a local path). The driver's scratch is a regular file, so any use of it on a local volume fails.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

import llm2llm_jobs.iteration as iteration_mod
import llm2llm_jobs.models as models_mod
import llm2llm_jobs.train as train_mod
from llm2llm.spec import parse_spec
from llm2llm_jobs import fanout
from llm2llm_jobs.train import ray_storage

RUN = "nodes"


# --- pure helpers ----------------------------------------------------------------------------------

def test_local_copy_uses_a_local_folder_in_place(tmp_path):
    with fanout.local_copy(str(tmp_path)) as path:
        assert path == str(tmp_path)
    with fanout.local_copy(None) as path:
        assert path is None
    assert tmp_path.is_dir()


def test_local_copy_fetches_a_remote_folder_and_removes_it():
    fs = fsspec.filesystem("memory")
    root = f"/lc-{uuid.uuid4().hex[:8]}"
    fs.pipe({f"{root}/model/adapter_config.json": b'{"r": 4}', f"{root}/model/sub/w.bin": b"\x00\x01"})
    try:
        with fanout.local_copy(f"memory://{root}/model") as path:
            local = Path(path)
            assert local.name == "model" and local.is_dir()
            assert (local / "adapter_config.json").read_bytes() == b'{"r": 4}'
            assert (local / "sub" / "w.bin").read_bytes() == b"\x00\x01"
        assert not local.exists() and not local.parent.exists()
    finally:
        fs.rm(root, recursive=True)


def test_ray_storage_local_folder_and_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_storage("rel/ray") == (str(tmp_path / "rel" / "ray"), None)

    import pyarrow.fs

    fs = fsspec.filesystem("memory")
    root = f"/rs-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"{root}/ray/probe", b"x")
    try:
        path, arrow_fs = ray_storage(f"memory://{root}/ray")
        assert path == f"{root}/ray"
        # Ray Train sees the same objects the run's fsspec storage does.
        assert arrow_fs.get_file_info(f"{root}/ray/probe").type == pyarrow.fs.FileType.File
    finally:
        fs.rm(root, recursive=True)


# --- the iteration's train and infer stages ---------------------------------------------------------

class Fakes:
    """run_train and run_tasks as seen from the driver; each records what it was handed."""

    def __init__(self, store_fs):
        self.fs = store_fs
        self.train_cfgs: list = []
        self.infer_calls: list[dict] = []
        self.adapter_files: list[list[str]] = []
        self.warm_runs: list[str | None] = []

    def run_train(self, cfg, rows: pa.Table, warm_run: str | None = None):
        self.train_cfgs.append(cfg)
        self.warm_runs.append(warm_run)
        assert rows.column_names == ["prompt", "target"] and rows.num_rows > 0
        # What Ray Train leaves in its storage, written through the run's own filesystem.
        path, _ = ray_storage(cfg.storage_path)
        fs, _ = fsspec.core.url_to_fs(cfg.storage_path)
        _plant(fs, f"{path}/train-x/checkpoint_0/adapter_config.json")
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text('{"r": 4}')
        (out / train_mod.RESULT_FILE).write_text("{}")
        return {"steps": 2, "tokens": 40, "loss": 1.25, "worker_hosts": ["pod-a", "pod-b"]}

    def run_tasks(self, path, calls, on_result=None, **_):
        if path.endswith(":infer_shard"):
            out = []
            for c in calls:
                self.infer_calls.append(c)
                with fanout.local_copy(c["adapter"]) as adapter:  # what the task does on its node
                    self.adapter_files.append(sorted(os.listdir(adapter)))
                out.append((["#### 0"] * len(c["prompts"]), "fake", {}))
        else:
            assert all(c["model_path"] is None for c in calls), "the teacher is resolved by each task"
            out = [{"rows": [], "prompt_tokens": 7, "completion_tokens": 3, "stopped": None} for _ in calls]
        for i, res in enumerate(out):
            if on_result is not None:
                on_result(i, res)
        return out


def _plant(fs, path: str) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, b"{}")


def _driver_must_not_resolve(name: str) -> str:
    raise AssertionError(f"the driver resolved {name!r}")


@pytest.fixture(params=["local", "memory"])
def output(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    root = f"/job-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_train_and_infer_hand_workers_names_and_storage_locations(output, tmp_path, monkeypatch):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(4)))
    spec = parse_spec({"data": {"seed": str(seed)}, "output": output, "student": {"model": "tiny-llama"},
                       "infer": {"replicas": 2}, "loop": {"maxIterations": 2}, "filters": {"decontaminate": False}})
    scratch = tmp_path / "driver-scratch"
    job = iteration_mod.Iteration(RUN, "uid-n", spec, 0, 3, scratch)
    store = job.store
    if store.is_local:
        scratch.write_text("a file: with a shared volume the driver's scratch must stay unused\n")
    fakes = Fakes(store.fs)
    monkeypatch.setattr(train_mod, "run_train", fakes.run_train)
    monkeypatch.setattr(models_mod, "resolve_model", _driver_must_not_resolve)
    monkeypatch.setattr(iteration_mod.fanout, "run_tasks", fakes.run_tasks)

    # Leftovers of killed attempts 1 and 2: Ray Train folders and half-written models.
    train_dir = store.stage_dir(0, "train")
    for leftover in ("_ray-a1/train-y/state.json", "_ray-a2/x", "model/half.bin", "model-a2/half.bin"):
        _plant(store.fs, f"{train_dir}/{leftover}")
    if store.is_local:
        Path(train_dir, ".model-a2").mkdir()

    it = job.run()
    assert it.index == 0

    (cfg,) = fakes.train_cfgs
    assert cfg.model == "tiny-llama"  # the name: each worker resolves it on its own node
    assert cfg.storage_path == store.uri("iter-0", "train", "_ray-a3")
    if store.is_local:
        assert cfg.storage_path == f"{train_dir}/_ray-a3" and cfg.output_dir == f"{train_dir}/.model-a3"
    else:
        assert cfg.storage_path.startswith("memory://") and Path(cfg.output_dir).is_relative_to(scratch)
    # The train stage's folder holds the model and the marker, nothing of Ray Train or of earlier attempts. On an
    # object store (no rename) the model has a folder of this attempt's own, which the marker names.
    model_dir = "model" if store.is_local else "model-a3"
    names = sorted(posixpath.basename(p.rstrip('/')) for p in store.fs.ls(train_dir, detail=False))
    assert names == ["_DONE.json", model_dir], names
    model = sorted(posixpath.basename(p.rstrip('/')) for p in store.fs.ls(f"{train_dir}/{model_dir}", detail=False))
    assert model == ["adapter_config.json", train_mod.RESULT_FILE]
    assert store.stage_done(0, "train")["worker_hosts"] == ["pod-a", "pod-b"]
    assert store.stage_done(0, "train")["model_dir"] == model_dir
    assert store.trained_model(0) == store.uri("iter-0", "train", model_dir)

    assert len(fakes.infer_calls) == 2
    for call, files in zip(fakes.infer_calls, fakes.adapter_files):
        assert call["model"] == "tiny-llama"
        assert call["adapter"] == store.uri("iter-0", "train", model_dir)
        assert files == ["adapter_config.json", train_mod.RESULT_FILE]
    assert scratch.is_file() == store.is_local
