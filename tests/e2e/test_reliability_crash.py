"""Operator crash points: SIGKILL the operator at 13 points of one run that the test plays (KubeRay's part:
RayJob status; the job's part: iteration manifests in storage), restarting it each time.

Each kill waits for an observable state first (an object, a status field, or the test's own write), then
kills at once, so the restarted operator has to pick up from whatever the dead one had or had not written.
A watch records every RayJob ever created. At the end: the run completed with each iteration counted once,
one RayJob per (iteration, attempt) ever, the backoff survived a restart, status.iterations equals storage's
manifests, and deleting the run (killed mid-finalizer too) removed its RayJobs and kept its data.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone

from llm2llm.planner import job_name
from llm2llm.status import IterationStatus, RunStatus, TokenCounts
from llm2llm.storage import RunStorage
from tests.e2e.test_operator_harness import Api, Operator, augrun_crd, run_doc, wait_for  # noqa: F401
from tests.e2e.test_reliability_harness import (LABEL_ATTEMPT, LABEL_ITERATION, LABEL_RUN_UID, RayJobRecorder,
                                                start_operator)

BACKOFF = 15  # long enough for a restart (2-8 s here) to land inside it


def _iteration(index: int, job: str, attempt: int) -> IterationStatus:
    return IterationStatus(index=index, attempt=attempt, train_rows=10 + index, train_steps=4, train_loss=1.2,
                           seed_accuracy=0.5 + index / 10, failures=3 - index, generated=4, kept=2 - index,
                           tokens=TokenCounts(teacher_prompt=100, teacher_completion=40), job=job,
                           seconds={"train": 1.0}, started_at="2026-01-01T00:00:00Z",
                           finished_at="2026-01-01T00:01:00Z")


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_sigkill_at_every_step(control_plane, augrun_crd, namespace, tmp_path, capsys):  # noqa: F811
    api = Api(control_plane, namespace)
    out = tmp_path / "out"
    log = tmp_path / "operator.log"
    state: dict[str, Operator] = {"op": start_operator(control_plane, log, namespace)}
    kills: list[tuple[str, float]] = []
    started = time.monotonic()

    restarts: list[float] = []

    def kill_and_restart(point: str) -> None:
        state["op"].kill()
        kills.append((point, time.monotonic() - started))
        t0 = time.monotonic()
        state["op"] = start_operator(control_plane, log, namespace)
        restarts.append(time.monotonic() - t0)

    def job_state(name: str) -> str | None:
        return next((j.get("state") for j in api.status("crash").get("jobs", []) if j["name"] == name), None)

    try:
        with RayJobRecorder(control_plane, namespace) as rec:
            api.create_run(run_doc("crash", out, loop={"maxIterations": 2},
                                   retry={"maxAttempts": 3, "backoffSeconds": BACKOFF}))
            kill_and_restart("1 right after apply")
            uid = api.run("crash")["metadata"]["uid"]
            a1, a2, a3, b1 = (job_name("crash", uid, 0, 1), job_name("crash", uid, 0, 2),
                              job_name("crash", uid, 0, 3), job_name("crash", uid, 1, 1))
            store = RunStorage(str(out), "crash")

            wait_for(lambda: a1 in rec.names(), "RayJob a1", every=0.02)
            kill_and_restart("2 the first RayJob exists (status maybe not yet written)")
            wait_for(lambda: job_state(a1) == "Pending", "a1 recorded in status")

            api.set_rayjob_status(a1, jobDeploymentStatus="Running", jobStatus="RUNNING")
            kill_and_restart("3 right after KubeRay marks a1 Running")
            wait_for(lambda: job_state(a1) == "Running", "a1 Running in status")

            api.set_rayjob_status(a1, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed",
                                  message="boom")
            kill_and_restart("4 right after KubeRay marks a1 Failed, before the status records it")
            wait_for(lambda: job_state(a1) == "Failed", "a1 Failed in status")

            cond = wait_for(lambda: (c := api.condition("crash", "Progressing")) and c["reason"] == "BackingOff" and c,
                            "the retry backoff")
            retry_after = api.status("crash")["retryAfter"]
            kill_and_restart("5 during the retry backoff")
            inside = datetime.now(timezone.utc) < _ts(retry_after)  # the new operator is up before the backoff ends
            wait_for(lambda: a2 in rec.names(), "RayJob a2 after the backoff", 60)
            a2_obj = api.rayjob(a2)
            assert _ts(a2_obj["metadata"]["creationTimestamp"]) >= _ts(retry_after), (a2_obj["metadata"], retry_after)

            wait_for(lambda: job_state(a2) == "Pending", "a2 recorded")
            api.set_rayjob_status(a2, jobDeploymentStatus="Running", jobStatus="RUNNING")
            wait_for(lambda: job_state(a2) == "Running", "a2 Running in status")
            api.patch_spec("crash", {"suspend": True})
            kill_and_restart("6 right after spec.suspend is set")
            wait_for(lambda: api.status("crash").get("phase") == "Suspended" and api.rayjob(a2) is None,
                     "Suspended, a2 deleted")
            assert job_state(a2) == "Suspended", (
                f"a2 ended {job_state(a2)!r}, not Suspended: the kill hit the window between deleting the RayJob "
                "and writing the status (see tests/unit/test_reliability_crash_windows.py)")

            before = len(rec.names())
            kill_and_restart("7 while suspended")
            time.sleep(2.5)  # a couple of timer ticks of the new operator
            assert len(rec.names()) == before and api.status("crash")["phase"] == "Suspended"

            api.patch_spec("crash", {"suspend": False})
            kill_and_restart("8 right after resuming")
            wait_for(lambda: a3 in rec.names(), "RayJob a3 after resuming")
            wait_for(lambda: job_state(a3) == "Pending", "a3 recorded")
            api.set_rayjob_status(a3, jobDeploymentStatus="Running", jobStatus="RUNNING")
            wait_for(lambda: job_state(a3) == "Running", "a3 Running in status")

            store.write_iteration(_iteration(0, a3, 3))  # the job commits iteration 0 ...
            kill_and_restart("9 right after the job wrote iteration 0's manifest")
            wait_for(lambda: b1 in rec.names(), "RayJob b1 (iteration 1 starts once iteration 0 is committed)")
            api.set_rayjob_status(a3, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")  # ... then exits
            kill_and_restart("10 right after KubeRay marks a3 Complete")
            wait_for(lambda: job_state(a3) == "Succeeded"
                     and [i["index"] for i in api.status("crash")["iterations"]] == [0],
                     "a3 Succeeded and iteration 0 in status")

            wait_for(lambda: job_state(b1) == "Pending", "b1 recorded")
            kill_and_restart("11 with b1 pending")
            api.set_rayjob_status(b1, jobDeploymentStatus="Running", jobStatus="RUNNING")
            wait_for(lambda: job_state(b1) == "Running", "b1 Running in status")
            store.write_iteration(_iteration(1, b1, 1))
            api.set_rayjob_status(b1, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
            kill_and_restart("12 right after the last iteration's manifest and Complete")
            wait_for(lambda: api.status("crash").get("phase") == "Succeeded", "phase Succeeded")

            st = api.status("crash")
            final = RunStatus.model_validate(st)
            stored = store.iterations()
            reasons = api.event_reasons("crash")

            api.delete_run("crash")
            kill_and_restart("13 right after delete (finalizer pending)")
            wait_for(lambda: api.run("crash") is None, "the run to be gone")
            left = api.rayjobs(uid)
            seen = rec.snapshot()
    finally:
        state["op"].stop()

    # Each iteration counted once; status equals storage.
    assert [i.index for i in final.iterations] == [0, 1] == sorted(stored)
    assert final.iterations == [stored[0], stored[1]]
    assert st["stopReason"] == "MaxIterations" and st["augmentedRows"] == 2 + 1
    assert [(j.name, j.state) for j in final.jobs] == [(a1, "Failed"), (a2, "Suspended"), (a3, "Succeeded"),
                                                       (b1, "Succeeded")]
    # One RayJob per (iteration, attempt), ever; all named by the planner; none left after deletion.
    per_attempt = Counter((s.labels[LABEL_ITERATION], s.labels[LABEL_ATTEMPT]) for s in seen)
    assert per_attempt == Counter({("0", "1"): 1, ("0", "2"): 1, ("0", "3"): 1, ("1", "1"): 1}), per_attempt
    assert sorted(s.name for s in seen) == sorted([a1, a2, a3, b1])
    assert {s.labels[LABEL_RUN_UID] for s in seen} == {uid}
    assert left == []
    assert store.iterations() == stored  # deleteData is false: the data stays
    # Events may be lost to a kill (they are posted after the status write) but never doubled.
    assert reasons.count("RunSucceeded") <= 1 and reasons.count("IterationSucceeded") <= 2, reasons
    assert len(kills) >= 10
    with capsys.disabled():
        print(f"\ncrash points: {len(kills)} SIGKILLs in {time.monotonic() - started:.0f}s; restarts "
              f"{min(restarts):.1f}-{max(restarts):.1f}s; restart inside the backoff: {inside}; RayJobs ever created: "
              f"{len(seen)}; events: {dict(Counter(reasons))}")
