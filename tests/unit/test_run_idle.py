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
    out = _idle(sys.executable, "-c", "import os; print(os.getsid(0), os.nice(0))")
    assert out.returncode == 0, out.stderr
    sid, nice = map(int, out.stdout.split())
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


def test_stopping_it_stops_the_whole_session():
    """Ctrl-C or a kill of `make test` reaches run-idle in the caller's process group; what runs in the command's
    own session (a go build's compilers, say) is beyond that signal, so run-idle must pass it on."""
    proc = subprocess.Popen([str(SCRIPT), "bash", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        inner = int(proc.stdout.readline())
        assert os.getsid(inner) != os.getsid(0)
        proc.terminate()
        assert proc.wait(10) != 0
        deadline = time.monotonic() + 10
        while _alive(inner) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(inner), "the command's child outlived run-idle"
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
