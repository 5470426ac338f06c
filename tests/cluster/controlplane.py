"""A real Kubernetes control plane for tests: etcd + kube-apiserver + the garbage collector on 127.0.0.1,
no kubelet.

Binaries come from build.sh (built from the official Go modules, cached per machine). Only the
standard library and the `openssl` binary are used, so this also runs outside the venv.

What works: the full API (CRDs with real schema validation, status subresources, watches, RBAC,
impersonation, admission) and garbage collection (kube-controller-manager running only its garbage
collector: ownerReferences, foreground and background deletion). What does not: anything that needs the
other controllers or a kubelet (pods never run, deleted namespaces stay Terminating forever).

Library use:
    cp = ControlPlane(workdir).start()      # raises ControlPlaneError with the log tail on failure
    ... cp.kubeconfig, cp.server, cp.token, cp.ca_file, cp.ready_seconds, cp.apiserver_rss_bytes
    cp.stop()

CLI:
    python tests/cluster/controlplane.py up --dir DIR     # detached; prints `export KUBECONFIG=...`
    python tests/cluster/controlplane.py down --dir DIR
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
ADMIN_USER = "admin"


class ControlPlaneError(RuntimeError):
    pass


def build_binaries(names: list[str] | None = None) -> Path:
    """Runs build.sh for ``names`` (default: every binary of the node) and returns the bin dir. A cache
    hit is instant; cold, the API server alone takes 5-8 min on 2 cores, the whole node 15-25 min."""
    out = subprocess.run([str(BUILD_SH), *(names or [])], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets stay open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel SIGKILLs it when the parent dies, so a killed
    # pytest never leaks a running apiserver/etcd. Linux only; harmless to skip elsewhere.
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _exe_name(pid: int) -> str:
    try:
        return Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after timeout, for a process that is not our child (CLI `down`)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ControlPlane:
    def __init__(self, workdir: str | os.PathLike, bin_dir: str | os.PathLike | None = None,
                 detach: bool = False):
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.detach = detach  # CLI mode: processes outlive this Python process
        self.kubeconfig = self.workdir / "kubeconfig"
        self.ca_file = self.workdir / "certs" / "apiserver.crt"  # self-signed by the apiserver
        self.etcd_log = self.workdir / "etcd.log"
        self.apiserver_log = self.workdir / "kube-apiserver.log"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}  # our children (not after CLI `up`)
        self.server = ""
        self.token = ""
        self.ready_seconds = 0.0
        self.apiserver_rss_bytes = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "ControlPlane":
        """Starts etcd and kube-apiserver and waits for /readyz. Stops everything on failure."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        bin_dir = self.bin_dir or build_binaries(["kube-apiserver", "etcd", "kube-controller-manager"])
        self.workdir.mkdir(parents=True, exist_ok=True)
        etcd_client, etcd_peer, api_port = free_ports(3)
        self.server = f"https://127.0.0.1:{api_port}"
        self.token = secrets.token_hex(16)
        t0 = time.monotonic()

        self._spawn("etcd", [
            bin_dir / "etcd", "--name=test",
            f"--data-dir={self.workdir / 'etcd-data'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",  # throwaway data: skip fsync, much faster on slow disks
        ], self.etcd_log)
        self._wait_http(f"http://127.0.0.1:{etcd_client}/health", "etcd", self.etcd_log,
                        t0 + timeout)

        sa_key = self.workdir / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                       capture_output=True)
        tokens = self.workdir / "tokens.csv"  # token,user,uid,"groups"
        tokens.write_text(f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        self._spawn("kube-apiserver", [
            bin_dir / "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1", f"--secure-port={api_port}",
            # Without these the apiserver advertises a host interface (and fails if there is none)
            # and keeps trying to write loopback Endpoints for the `kubernetes` Service.
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--cert-dir={self.ca_file.parent}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={tokens}",
            # No controller-manager creates ServiceAccount tokens, so this plugin would reject pods.
            "--disable-admission-plugins=ServiceAccount",
        ], self.apiserver_log)
        self._wait_http(f"{self.server}/readyz", "kube-apiserver", self.apiserver_log,
                        t0 + timeout, authenticated=True)

        self._write_kubeconfig()
        # Only the garbage collector: what deleting with ownerReferences or a propagation policy needs (KubeRay's
        # RayJob -> RayCluster chain, foreground deletion), and nothing that would act on the tests' objects.
        gc_port, = free_ports(1)
        self._spawn("kube-controller-manager", [
            bin_dir / "kube-controller-manager", f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--controllers=garbagecollector", "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={gc_port}", "--use-service-account-credentials=false",
        ], self.workdir / "kube-controller-manager.log")
        self._wait_https_ok(f"https://127.0.0.1:{gc_port}/healthz", "kube-controller-manager",
                            self.workdir / "kube-controller-manager.log", t0 + timeout)
        self.ready_seconds = time.monotonic() - t0
        self.apiserver_rss_bytes = rss_bytes(self.pids["kube-apiserver"])
        (self.workdir / "pids.json").write_text(json.dumps(self.pids) + "\n")
        print(f"control plane ready in {self.ready_seconds:.1f}s at {self.server}, "
              f"kube-apiserver RSS {self.apiserver_rss_bytes / 2**20:.0f} MiB", file=sys.stderr)

    def stop(self) -> None:
        """Stops the controller, then the apiserver (it depends on etcd), then etcd. Safe to call repeatedly."""
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            pid = self.pids.pop(name, None)
            proc = self._procs.pop(name, None)
            if proc:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # From a pids file: guard against pid reuse since it was written.
            elif pid and _exe_name(pid) == name:
                terminate(pid)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- helpers ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list, log: Path) -> None:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=self.detach,  # detached: not killed with the CLI's terminal
                preexec_fn=None if self.detach else _die_with_parent)
        self.pids[name] = proc.pid
        self._procs[name] = proc

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _wait_http(self, url: str, name: str, log: Path, deadline: float,
                   authenticated: bool = False) -> None:
        """Polls url until it answers 200, the process dies, or the deadline passes."""
        last = "no serving cert in the cert dir yet" if authenticated else "not polled yet"
        while time.monotonic() < deadline:
            if not _alive(self.pids[name]):
                raise ControlPlaneError(f"{name} exited during startup; {log} tail:\n{tail(log)}")
            # The apiserver writes its self-signed cert at startup; verify TLS with it.
            if not authenticated or self.ca_file.exists():
                req = urllib.request.Request(url)
                ctx = None
                if authenticated:
                    req.add_header("Authorization", f"Bearer {self.token}")
                    ctx = self._ssl_context()
                try:
                    with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}"
                except (OSError, ssl.SSLError) as e:  # URLError/HTTPError are OSErrors
                    last = repr(e)
            time.sleep(0.25)
        raise ControlPlaneError(f"{name} not ready at {url} in time (last: {last}); "
                                f"{log} tail:\n{tail(log)}")

    def _wait_https_ok(self, url: str, name: str, log: Path, deadline: float) -> None:
        """Polls a component's self-signed /healthz until it answers 200 (its certificate is not checked: it is
        only asked whether it is up)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        last = "not polled yet"
        while time.monotonic() < deadline:
            if not _alive(self.pids[name]):
                raise ControlPlaneError(f"{name} exited during startup; {log} tail:\n{tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (OSError, ssl.SSLError) as e:
                last = repr(e)
            time.sleep(0.25)
        raise ControlPlaneError(f"{name} not healthy at {url} in time (last: {last}); {log} tail:\n{tail(log)}")

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {self.server}
    certificate-authority: {self.ca_file}
users:
- name: {ADMIN_USER}
  user:
    token: {self.token}
contexts:
- name: test
  context: {{cluster: test, user: {ADMIN_USER}}}
current-context: test
""")
        self.kubeconfig.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["up", "down"])
    ap.add_argument("--dir", required=True, help="work dir: logs, etcd data, pids, kubeconfig")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    cp = ControlPlane(args.dir, detach=True)
    if args.command == "up":
        if (cp.workdir / "pids.json").exists():
            ap.error(f"{cp.workdir}/pids.json exists: run `down --dir {args.dir}` first")
        try:
            cp.start(args.timeout)
        except ControlPlaneError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={cp.kubeconfig}")
    else:
        pids_file = cp.workdir / "pids.json"
        if pids_file.exists():
            cp.pids = json.loads(pids_file.read_text())
            cp.stop()
            pids_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
