"""scripts/run-idle.sh, which `make test` runs its background builds under: they must only get the CPU the tests
leave idle, also against processes of other sessions (the tests' Ray heads and job drivers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "run-idle.sh"
AUTOGROUP = Path("/proc/self/autogroup")


def _idle(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=60, **kw)


def test_runs_the_command_in_a_session_of_its_own_at_nice_19():
    out = _idle(sys.executable, "-c", "import os; print(os.getsid(0), os.getpid(), os.nice(0))")
    assert out.returncode == 0, out.stderr
    sid, pid, nice = map(int, out.stdout.split())
    assert sid != os.getsid(0)  # a session (so an autogroup) apart from the caller's
    assert nice == 19


@pytest.mark.skipif(not AUTOGROUP.exists(), reason="kernel without autogroup scheduling")
def test_its_autogroup_is_set_to_nice_19():
    out = _idle("cat", "/proc/self/autogroup")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["nice", "19"]


def test_exit_status_and_arguments_pass_through():
    out = _idle("bash", "-c", 'printf "%s|" "$@"; exit 7', "x", "two words", "")
    assert out.returncode == 7
    assert out.stdout == "two words||"
    assert _idle().returncode == 2  # no command: usage


@pytest.mark.skipif(not AUTOGROUP.exists() or (os.cpu_count() or 1) > 8,
                    reason="needs autogroup scheduling and few enough CPUs to fill")
def test_it_waits_while_another_session_keeps_every_cpu_busy():
    """What the builds rely on: a short command under run-idle, started while every CPU spins in other sessions
    (as the tests' Ray processes do), ends only once they stop. Under plain `nice -n 19` it takes a session's
    share and ends long before them."""
    spin_s = 3.0
    spin = f"import time\nend = time.monotonic() + {spin_s}\nwhile time.monotonic() < end: pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", spin], start_new_session=True) for _ in range(os.cpu_count() or 1)]
    t0 = time.monotonic()
    try:
        time.sleep(0.5)  # the busy sessions are spinning
        # ~0.2 s of work on a free CPU
        out = _idle(sys.executable, "-c", "sum(range(3_000_000))")
        ended = time.monotonic() - t0
    finally:
        for p in busy:
            p.wait(30)
    assert out.returncode == 0, out.stderr
    assert ended > spin_s - 0.3, f"ended {ended:.1f} s in, while the other sessions still had every CPU"
