"""Where the run's warm actors (engines, trainers) go on a real multi-node Ray cluster shaped like the
cluster template's: a head with no CPUs (it runs the driver only) and two one-CPU workers that join late.

The actors ask Ray for no resources between calls (so the stages' tasks can use every CPU), and Ray places
such an actor on a random node whatever a soft node affinity says: on the node, both trainers landed on the
head, whose model cache is not the workers'. So placement waits for the workers and pins hard."""

from __future__ import annotations

import threading
import time

import pytest

from llm2llm_jobs.engines import _placement

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_actors_wait_for_the_workers_and_never_land_on_the_cpu_less_head(cluster):
    import ray

    @ray.remote
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    head = ray.get_runtime_context().get_node_id()
    # What a 2-rank trainer group asks for: 2 CPUs across the cluster before its first rank is placed. Asked
    # before the workers exist (a RayCluster's worker pods come up after the head has started the driver).
    strategies: list = []
    asking = threading.Thread(target=lambda: strategies.extend(_placement(r, 0, total=2, timeout=120)
                                                                for r in range(2)))
    asking.start()
    time.sleep(3)
    assert asking.is_alive() and not strategies  # still waiting: no CPU anywhere yet
    cluster.add_node(num_cpus=1)
    time.sleep(3)
    assert asking.is_alive() and not strategies  # one CPU is not the group's two
    cluster.add_node(num_cpus=1)
    asking.join(60)
    assert len(strategies) == 2
    workers = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    assert len(workers) == 2 and head not in workers
    for _ in range(3):  # soft affinity missed its node in 4 of 6 placements here; hard, never
        placed = [ray.get(Where.options(num_cpus=0, scheduling_strategy=s).remote().node.remote())
                  for s in strategies]
        assert placed == workers, (placed, workers, head)


def test_placement_says_what_the_cluster_lacks(cluster):
    cluster.add_node(num_cpus=1)
    with pytest.raises(RuntimeError, match="offers 1 CPU after 3s; 2 needed"):
        _placement(0, 0, total=2, timeout=3)
