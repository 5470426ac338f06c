"""The pure planner: exactly one job per attempt, bounded retries, resumable from observed state."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from llm2llm.planner import Backoff, Finish, Idle, JobObservation, Launch, Observed, Stop, Wait, advance, job_name, stop_reason
from llm2llm.runner import format_table
from llm2llm.spec import parse_spec
from llm2llm.status import IterationStatus, RunStatus

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def spec(**over):
    doc = {"data": {"seed": "s.jsonl"}, "output": "/tmp/out", "loop": {"maxIterations": 3},
           "retry": {"maxAttempts": 2, "backoffSeconds": 10}}
    for k, v in over.items():
        doc[k] = v
    return parse_spec(doc)


def step(sp, st, iterations=None, jobs=None, now=T0, stages=()):
    return advance(sp, st, Observed(iterations or {}, jobs or {}, tuple(stages), now), run_name="gsm8k", run_uid="uid-1", generation=1)


def it(i, acc=0.5, failures=3, kept=2, **kw):
    return IterationStatus(index=i, seed_accuracy=acc, failures=failures, kept=kept, **kw)


def test_job_names_are_deterministic_and_dns_safe():
    a = job_name("My_Run.x", "uid", 2, 1)
    assert a == job_name("My_Run.x", "uid", 2, 1)
    assert a != job_name("My_Run.x", "uid", 2, 2) and a != job_name("My_Run.x", "other", 2, 1)
    assert a.endswith("-i2-a1") and len(a) <= 63 and a == a.lower() and "_" not in a and "." not in a


def test_first_step_launches_iteration_zero_once():
    sp = spec()
    st, action, events = step(sp, RunStatus())
    assert isinstance(action, Launch) and (action.iteration, action.attempt) == (0, 1)
    assert st.phase == "Running" and st.iteration_label == "1/3"
    assert [j.name for j in st.jobs] == [action.name]
    assert events[0].reason == "IterationStarted"
    # A restarted caller that sees the job running waits on it: no second job.
    st2, action2, _ = step(sp, st, jobs={action.name: JobObservation(0, 1, "Running")}, stages=("prepare",))
    assert isinstance(action2, Wait) and action2.name == action.name
    assert st2.stage == "train"
    assert len(st2.jobs) == 1


def test_a_job_unknown_to_status_but_live_is_adopted_not_duplicated():
    sp = spec()
    name = job_name("gsm8k", "uid-1", 0, 1)
    st, action, _ = step(sp, RunStatus(), jobs={name: JobObservation(0, 1, "Running")})
    assert isinstance(action, Wait) and action.name == name


def test_failed_attempt_backs_off_then_retries_then_gives_up():
    sp = spec()
    st, launch, _ = step(sp, RunStatus())
    st, action, events = step(sp, st, jobs={launch.name: JobObservation(0, 1, "Failed", "OOM")})
    assert isinstance(action, Backoff) and action.attempt == 2
    assert any(e.reason == "JobFailed" and "OOM" in e.message for e in events)
    assert st.condition("Progressing").reason == "BackingOff"
    later = datetime.now(timezone.utc) + timedelta(seconds=11)
    st, action, events = step(sp, st, now=later)
    assert isinstance(action, Launch) and action.attempt == 2
    assert any(e.reason == "Retrying" for e in events)
    st, action, _ = step(sp, st, jobs={action.name: JobObservation(0, 2, "Failed", "OOM again")}, now=later)
    assert isinstance(action, Finish) and action.phase == "Failed" and action.reason == "IterationFailed"
    assert "OOM again" in action.message
    assert st.phase == "Failed" and st.condition("Failed").status == "True"
    # Finished runs stay finished and emit no new events.
    _, action, events = step(sp, st, now=later)
    assert isinstance(action, Idle) and events == []


def test_a_vanished_job_counts_as_a_failed_attempt():
    sp = spec()
    st, launch, _ = step(sp, RunStatus())
    st, action, _ = step(sp, st, jobs={})
    assert st.jobs[0].state == "Missing"
    assert isinstance(action, Backoff)


def test_succeeded_job_without_manifest_is_a_failure():
    sp = spec()
    st, launch, _ = step(sp, RunStatus())
    st, action, _ = step(sp, st, jobs={launch.name: JobObservation(0, 1, "Succeeded")})
    assert st.jobs[0].state == "Failed" and "no iteration manifest" in st.jobs[0].message


def test_manifests_advance_the_loop_and_finish_at_max_iterations():
    sp = spec()
    st, launch, _ = step(sp, RunStatus())
    done = {0: it(0)}
    st, action, events = step(sp, st, iterations=done, jobs={launch.name: JobObservation(0, 1, "Succeeded")})
    assert isinstance(action, Launch) and action.iteration == 1 and action.attempt == 1
    assert [e.reason for e in events] == ["IterationSucceeded", "IterationStarted"]
    assert st.iterations[0].seed_accuracy == 0.5 and st.augmented_rows == 2
    assert st.iterations[0].job == launch.name  # which Ray job produced the iteration
    done = {0: it(0), 1: it(1, 0.6), 2: it(2, 0.7, kept=0)}
    st, action, events = step(sp, st, iterations=done)
    assert isinstance(action, Finish) and action.reason == "MaxIterations"
    assert st.phase == "Succeeded" and st.iteration_label == "3/3" and st.seed_accuracy == 0.7
    assert st.condition("Succeeded").status == "True" and st.condition("Progressing").status == "False"


def test_stop_reasons():
    sp = spec(loop={"maxIterations": 10, "stopWhen": {"noFailures": True, "plateau": {"iterations": 2, "minGain": 0.01}}})
    assert stop_reason(sp, [it(0, 1.0, 0)]) == "NoFailures"
    assert stop_reason(sp, [it(0, 0.5), it(1, 0.6)]) is None
    assert stop_reason(sp, [it(0, 0.5), it(1, 0.6), it(2, 0.605), it(3, 0.605)]) == "Plateau"
    assert stop_reason(sp, [it(0, 0.5), it(1, 0.6), it(2, 0.7)]) is None
    budget = spec(budget={"teacherTokens": 100})
    used = it(0)
    used.tokens.teacher_completion = 100
    assert stop_reason(budget, [used]) == "TeacherBudget"


def test_suspend_stops_the_running_job_and_resume_relaunches_without_using_an_attempt():
    sp = spec()
    st, launch, _ = step(sp, RunStatus())
    suspended = spec(suspend=True)
    st, action, _ = step(suspended, st, jobs={launch.name: JobObservation(0, 1, "Running")})
    assert isinstance(action, Stop) and action.name == launch.name
    assert st.phase == "Suspended" and st.condition("Suspended").status == "True"
    st, action, _ = step(suspended, st, jobs={launch.name: JobObservation(0, 1, "Failed", "stopped")})
    assert isinstance(action, Idle) and st.jobs[0].state == "Suspended"
    # Resuming launches at once (no backoff) under a new name; suspends never exhaust maxAttempts (2).
    for attempt in (2, 3, 4):
        st, action, _ = step(sp, st)
        assert isinstance(action, Launch) and action.attempt == attempt
        assert st.condition("Suspended").status == "False"
        st, action, _ = step(suspended, st, jobs={action.name: JobObservation(0, attempt, "Running")})
        assert isinstance(action, Stop)


def test_deadline_stops_a_job():
    sp = spec(activeDeadlineSeconds=60)
    st, launch, _ = step(sp, RunStatus())
    late = datetime.now(timezone.utc) + timedelta(seconds=120)
    st, action, events = step(sp, st, jobs={launch.name: JobObservation(0, 1, "Running")}, now=late)
    assert isinstance(action, Stop) and action.reason == "DeadlineExceeded"
    assert st.jobs[0].state == "Failed" and "DeadlineExceeded" in st.jobs[0].message
    assert any(e.reason == "JobFailed" for e in events)
    # The stopped attempt counts: the next step backs off before attempt 2.
    _, action, _ = step(sp, st, now=late)
    assert isinstance(action, Backoff) and action.attempt == 2


def test_no_new_data_ends_the_run_and_says_what_the_filter_refused():
    sp = spec()
    st, launch, _ = step(sp, RunStatus())
    refused = it(0, kept=0, generated=16, rejected={"bad_format": 11, "unparseable": 5}, stop_reason="NoNewData")
    st, action, events = step(sp, st, iterations={0: refused}, jobs={launch.name: JobObservation(0, 1, "Succeeded")})
    # No iteration 1: it would have trained on exactly the data of iteration 0.
    assert isinstance(action, Finish) and action.reason == "NoNewData" and st.phase == "Succeeded"
    message = st.condition("Succeeded").message
    assert "16 candidates" in message and "bad_format 11, unparseable 5" in message, message
    assert message in format_table(st)  # `llm2llm status` prints why
