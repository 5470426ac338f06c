"""One iteration on a Ray cluster of three Ray nodes on this machine, laid out like KubeRay: a head with no CPUs
(the driver's pod) and two worker nodes of 1 CPU each, so training's two workers land on different nodes and
every task runs off the driver's node.

What a pod boundary would break is made to break here: the driver's scratch is a regular file (any use of it
fails) and its model cache cannot be created, so nothing may be built or read on the driver's side; each
worker node has its own model cache and temp dir. The output is a local folder, standing for a shared volume.

The cluster and the driver run in a child process (``python -m tests.integration.test_two_nodes``), apart
from the session's local Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

RUN = "two-nodes"
WAIT_S = 900  # a deadline only for a broken run, never a speed check


def test_iteration_on_two_worker_nodes_uses_nothing_of_the_driver(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LLM2LLM_CACHE"] = "/dev/null/llm2llm-cache"  # mkdir fails: the driver cannot resolve a model
    env["LLM2LLM_TEST_TMP"] = str(tmp_path)  # tests.conftest, imported by the child, makes no folder of its own
    log = tmp_path / "driver.log"
    # Short: Ray's unix socket paths under it must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="l2l2n-", dir="/tmp")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.test_two_nodes", str(tmp_path), ray_tmp],
                                env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-6000:]
    nodes = json.loads((tmp_path / "nodes.json").read_text())

    # Training ran on both worker nodes, one rank each, never on the driver's.
    assert nodes["driver"] not in nodes["workers"]
    ranks = dict(re.findall(r"training worker (\d+) ran on \S+ \(Ray node (\w+)\)", text))
    assert sorted(ranks.values()) == sorted(nodes["workers"]), (ranks, nodes)
    # Each node resolved the model into its own cache.
    for k in range(2):
        assert (tmp_path / f"node-{k}" / "cache" / "models" / "tiny-llama-v1" / "config.json").is_file()

    from llm2llm.storage import RunStorage

    store = RunStorage(str(tmp_path / "out"), RUN)
    it = store.iteration(0)
    assert it is not None and it.train_steps == 2 and it.seed_accuracy is not None
    train = store.stage_done(0, "train")
    assert len(train["worker_hosts"]) == 1  # one machine: both nodes share its hostname
    assert sorted(p.name for p in Path(store.stage_dir(0, "train")).iterdir()) == ["_DONE.json", "model"]
    assert store.stage_done(0, "infer")["replicas"] == 2


def _main(root: Path, ray_tmp: str) -> None:
    """The child: start the cluster, run iteration 0 as the job's driver, record the node ids."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    from llm2llm.spec import parse_spec
    from llm2llm_jobs.iteration import Iteration
    from tests.integration.tiny import tiny_spec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": ray_tmp})
    try:
        workers = []
        for k in range(2):
            node = root / f"node-{k}"
            (node / "tmp").mkdir(parents=True)
            env = {"LLM2LLM_CACHE": str(node / "cache"), "TMPDIR": str(node / "tmp")}
            workers.append(cluster.add_node(num_cpus=1, env_vars=env, temp_dir=ray_tmp).node_id)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        driver = ray.get_runtime_context().get_node_id()
        (root / "nodes.json").write_text(json.dumps({"driver": driver, "workers": workers}))
        spec = tiny_spec(str(root / "out"), infer={"backend": "hf", "maxTokens": 3, "replicas": 2})
        spec["student"]["workers"] = 2
        scratch = root / "driver-scratch"
        scratch.write_text("a file: the driver's scratch must stay unused with a shared volume\n")
        Iteration(RUN, "uid-2n", parse_spec(spec), 0, 1, scratch).run()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _main(Path(sys.argv[1]), sys.argv[2])
