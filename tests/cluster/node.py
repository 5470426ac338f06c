"""A real single-node Kubernetes for tests and for trying the product: pods really run.

kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built by build.sh from
the Kubernetes Go module), etcd, Debian's containerd + runc + CNI plugins, CoreDNS and the KubeRay
operator (built from their Go modules), all as host processes of this machine. Images are never pulled:
they are built locally (scripts/build-images.sh) and imported from dockerd into the node's containerd.

The node is one per machine: it owns a bridge (``llm2llm0``, 10.244.0.1/24) that the apiserver, the
kubelet and CoreDNS bind to, and pod traffic never leaves by another interface (an iptables REJECT rule,
no masquerading, no upstream DNS). ``down`` undoes everything ``up`` did: it stops exactly the processes
it recorded (checked against /proc/<pid>/exe, never by name), unmounts what containerd and the kubelet
mounted, removes the iptables rules and chains that appeared and the bridge. Images stay in the node's
containerd store (a cache, like the built binaries) and the shared folder keeps its data.

Only the standard library and these binaries are used, so it also runs outside the venv:
openssl, iptables, ip, containerd, runc, ctr, docker (to import images), kubectl (install-kubetools.sh).

    python tests/cluster/node.py up --dir DIR     # prints `export KUBECONFIG=...`
    python tests/cluster/node.py down             # the state file says where DIR is
    python tests/cluster/node.py load IMAGE...    # docker image -> the node's containerd (if missing)

What the node is (addresses, fixed paths, config files) is nodeconf.py.

Library use: ``node = Node(workdir).start()`` ... ``node.kubeconfig`` ... ``node.stop()``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from controlplane import _alive, build_binaries, free_ports, tail  # noqa: E402

from nodeconf import (  # noqa: E402
    BRIDGE, CNI_NETWORK, CONTAINERD_ROOT, CONTAINERD_SOCK, CONTAINERD_STATE, NODE_IP, NODE_NAME,
    PAUSE_IMAGE, POD_CIDR, SERVICE_CIDR, SHARED_DIR, STATE_DIR, STATE_FILE, bootstrap_manifest, write_configs,
)

# Marks the one iptables rule the node adds itself; kube-proxy, the kubelet and CNI add the others.
RULE_COMMENT = "llm2llm-node: pod traffic stays on the bridge"
_OWNED_CHAINS = re.compile(r"^(KUBE-|CNI-)")
# Components in start order; `down` stops them in reverse.
COMPONENTS = ("containerd", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
              "kube-proxy", "coredns", "ray-operator")


class NodeError(RuntimeError):
    pass


def _run(*argv, check: bool = True, input: str | bytes | None = None, **kw) -> subprocess.CompletedProcess:
    text = not isinstance(input, bytes)
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=text, input=input, **kw)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _stop_pid(pid: int, exe: str, timeout: float = 20.0) -> bool:
    """SIGTERM then SIGKILL, only while /proc/<pid>/exe is still ``exe`` (a reused pid is left alone)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if _exe(pid) != exe or not _alive(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
    return not _alive(pid)


def kubetools_bin() -> Path:
    out = _run(REPO / "scripts" / "install-kubetools.sh").stdout
    return Path(out.strip().splitlines()[-1])


# --- what the node changes on the machine, so `down` can prove it undid it --------------------------

def iptables_rules() -> dict[str, list[str]]:
    """Rules and user chain names per family and table (counters dropped), as iptables-save prints them."""
    out: dict[str, list[str]] = {}
    for family in ("iptables", "ip6tables"):
        res = _run(f"{family}-save", check=False)
        table = ""
        for line in res.stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and line.split()[1] == "-":
                # User chains only: a built-in chain appears with its table on first use and stays.
                out.setdefault(f"{family}/{table}", []).append(line.split()[0])
            elif line.startswith("-A "):
                out.setdefault(f"{family}/{table}", []).append(line)
    return out


def node_mounts(workdir: Path | None = None) -> list[str]:
    """Mount points under the node's folders: containerd's, the kubelet's (in ``workdir``, default: the
    running node's), CNI network namespaces."""
    roots = [str(CONTAINERD_STATE), str(CONTAINERD_ROOT), "/run/netns/cni-", "/var/run/netns/cni-"]
    state = _read_state()
    if workdir is None and state:
        workdir = Path(state["dir"])
    if workdir is not None:
        roots.append(str(workdir / "kubelet"))
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point.startswith(r) for r in roots):
            points.append(point)
    return points


def node_processes() -> list[tuple[int, str]]:
    """Live processes of a node: its components (started in STATE_DIR), container shims (they name its
    containerd socket) and anything still running in a pod's cgroup."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd")
            cgroup = (d / "cgroup").read_text()
        except OSError:
            continue
        if cwd.startswith(str(STATE_DIR)) or str(STATE_DIR) in cmd or "/kubepods" in cgroup:
            if _alive(int(d.name)):
                found.append((int(d.name), cmd.strip()))
    return found


def own_shared() -> None:
    """The shared folder belongs to uid/gid 1000, the user of the Ray images and of the operator on the
    node (examples/cluster/values-node.yaml), so both can write and delete there."""
    for path in [SHARED_DIR, *SHARED_DIR.rglob("*")]:
        os.chown(path, 1000, 1000, follow_symlinks=False)


def bridge_exists() -> bool:
    return _run("ip", "link", "show", BRIDGE, check=False).returncode == 0


def _read_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def _live_state() -> dict | None:
    """The recorded node, only while every process it recorded still runs. A node whose processes are gone (a
    reboot that kept /run, a crash, an OOM kill) is not up: its leftovers are for ``down`` (or ``up``) to clear."""
    state = _read_state()
    if state is None:
        return None
    if all(_exe(e["pid"]) == e["exe"] and _alive(e["pid"]) for e in state.get("pids", {}).values()):
        return state
    return None


class Node:
    def __init__(self, workdir: str | os.PathLike, bin_dir: str | os.PathLike | None = None):
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.conf = STATE_DIR / "conf"  # configs the processes read (a path in argv marks them as ours)
        self.pki = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.server = f"https://{NODE_IP}:6443"
        self.pids: dict[str, dict] = {}  # name -> {pid, exe}
        self.timings: dict[str, float] = {}
        self._t0 = 0.0
        self._kubectl: Path | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 300.0, images: tuple[str, ...] = ()) -> "Node":
        """Brings the node up and waits until pods can run; on failure, undoes everything."""
        if _live_state() is not None:
            raise NodeError(f"a node is already up ({STATE_FILE}); run `node.py down` first")
        if _read_state() is not None:
            Node(_read_state()["dir"]).stop()  # a dead node's leftovers: mounts, rules, bridge, state
        try:
            self._start(timeout, images)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Safe to call at any point of a bring-up, and repeatedly."""
        state = _read_state()
        if state and not self.pids:
            self.pids = state["pids"]
            self.workdir = Path(state["dir"])
        self._delete_workloads()
        for name in reversed(COMPONENTS):
            if name == "containerd":
                self._remove_containers()
            entry = self.pids.pop(name, None)
            if entry:
                _stop_pid(entry["pid"], entry["exe"])
        self._kill_shims()
        self._unmount()
        self._clean_network()
        shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- bring-up ------------------------------------------------------------------------------

    def _start(self, timeout: float, images: tuple[str, ...]) -> None:
        bins = self.bin_dir or build_binaries()
        self.bin_dir = bins
        self._t0 = time.monotonic()
        deadline = self._t0 + timeout
        for tool in ("containerd", "runc", "ctr", "iptables", "ip", "openssl", "conntrack"):
            if shutil.which(tool) is None:
                raise NodeError(f"{tool} is missing: run scripts/node-prereqs.sh (Debian packages)")
        for d in (self.pki, self.logs, self.conf, CONTAINERD_STATE, CONTAINERD_ROOT, SHARED_DIR):
            d.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(json.dumps({"dir": str(self.workdir), "pids": {}}))
        own_shared()
        self._network()
        self._certificates()
        self._configs()

        self._spawn("containerd", ["containerd", f"--config={self.conf / 'containerd.toml'}"])
        self._wait(lambda: self._ctr("version", check=False).returncode == 0, "containerd", deadline)
        self.load_images((PAUSE_IMAGE, *images))
        # The timeout is for the bring-up: a first import of the 8 GB job image alone takes minutes.
        deadline = time.monotonic() + timeout

        etcd_client, etcd_peer, etcd_metrics = free_ports(3)
        self._spawn("etcd", [
            bins / "etcd", "--name=node", f"--data-dir={self.workdir / 'etcd-data'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=node=http://127.0.0.1:{etcd_peer}",
            f"--listen-metrics-urls=http://127.0.0.1:{etcd_metrics}",
            "--unsafe-no-fsync",  # throwaway data: fsync only slows the tests down
        ])
        self._wait_http(f"http://127.0.0.1:{etcd_client}/health", "etcd", deadline)
        p = self.pki
        self._spawn("kube-apiserver", [
            bins / "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            f"--bind-address={NODE_IP}", "--secure-port=6443", f"--advertise-address={NODE_IP}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.key'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            "--authorization-mode=Node,RBAC", f"--token-auth-file={self.conf / 'tokens.csv'}",
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
            f"--kubelet-client-certificate={p / 'kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'kubelet-client.key'}", "--kubelet-preferred-address-types=InternalIP",
        ])
        self._wait_http(f"{self.server}/readyz", "kube-apiserver", deadline, token=self._tokens["admin"])
        self._bootstrap_objects()

        self._spawn("kube-controller-manager", [
            bins / "kube-controller-manager", *self._kc_flags("controller-manager"),
            "--bind-address=127.0.0.1", "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p / 'sa.key'}",
            # Without it pods get no kube-root-ca.crt ConfigMap and their projected tokens never mount.
            f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-cidr={POD_CIDR}", f"--service-cluster-ip-range={SERVICE_CIDR}",
        ])
        self._spawn("kube-scheduler", [
            bins / "kube-scheduler", *self._kc_flags("scheduler"), "--bind-address=127.0.0.1",
            "--leader-elect=false"])
        self._spawn("kubelet", [
            bins / "kubelet", f"--config={self.conf / 'kubelet.yaml'}",
            f"--kubeconfig={self.conf / 'kubelet.kubeconfig'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}", f"--root-dir={self.workdir / 'kubelet'}", "--v=1"])
        self._spawn("kube-proxy", [bins / "kube-proxy", f"--config={self.conf / 'kube-proxy.yaml'}"])
        self._spawn("coredns", [bins / "coredns", "-conf", self.conf / "Corefile"])
        self._spawn("ray-operator", [
            bins / "ray-operator", f"--kubeconfig={self.conf / 'kuberay.kubeconfig'}",
            # The host cannot resolve *.svc.cluster.local: reach the Ray dashboards through the apiserver.
            "--use-kubernetes-proxy", "--enable-leader-election=false",
            f"--metrics-addr=127.0.0.1:{self._ports['kuberay_metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{self._ports['kuberay_health']}",
            "--log-stdout-encoder=console"])

        self._wait(self._node_ready, "node Ready", deadline)
        self._wait(lambda: self.kubectl("get", "sa", "default", "-n", "default", check=False).returncode == 0,
                   "the default ServiceAccount", deadline)
        self._wait_http(f"http://127.0.0.1:{self._ports['dns_ready']}/ready", "coredns", deadline)
        self._wait_http(f"http://127.0.0.1:{self._ports['kuberay_health']}/healthz", "ray-operator", deadline)
        self._lap("node ready")

    def _lap(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self._t0, 1)
        print(f"node: {what} at {self.timings[what]:.1f}s", file=sys.stderr)

    def _network(self) -> None:
        self.iptables_before = iptables_rules()
        (self.workdir / "iptables.before.json").write_text(json.dumps(self.iptables_before))
        if not bridge_exists():
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        addrs = _run("ip", "-o", "addr", "show", BRIDGE).stdout
        if f"{NODE_IP}/24" not in addrs:
            _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # Pods may talk to each other and to the node (INPUT), never to anything beyond this bridge.
        rule = ["FORWARD", "-s", POD_CIDR, "!", "-o", BRIDGE, "-m", "comment", "--comment", RULE_COMMENT,
                "-j", "REJECT"]
        if _run("iptables", "-C", *rule, check=False).returncode != 0:
            _run("iptables", "-I", *rule)
        # The kubelet and kube-proxy need forwarding, and bridged traffic seen by iptables (Services).
        if shutil.which("modprobe"):
            _run("modprobe", "br_netfilter", check=False)
        for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
            path = Path("/proc/sys") / key
            if path.exists() and path.read_text().strip() != "1":
                path.write_text("1\n")
        self._lap("network")

    def _certificates(self) -> None:
        p = self.pki

        def ssl_(*args):
            _run("openssl", *args, cwd=p)

        ssl_("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "30",
             "-subj", "/CN=llm2llm-node-ca")
        sans = ",".join(["DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                         "DNS:kubernetes.default.svc.cluster.local", "DNS:localhost", "IP:127.0.0.1",
                         f"IP:{NODE_IP}", f"IP:{next(ipaddress.ip_network(SERVICE_CIDR).hosts())}"])
        for name, subj, ext in (
            ("apiserver", "/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
            # The apiserver's client cert for the kubelet (logs, exec); the kubelet authorizes it by group.
            ("kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
             "extendedKeyUsage=clientAuth\n"),
        ):
            (p / f"{name}.ext").write_text(ext)
            ssl_("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj)
            ssl_("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "30", "-extfile", f"{name}.ext")
        ssl_("genrsa", "-out", "sa.key", "2048")
        # Static tokens: one identity per component (RBAC then grants each only its own role).
        users = {
            "admin": ("admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", ""),
            "scheduler": ("system:kube-scheduler", ""),
            "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
            "proxy": ("system:kube-proxy", ""),
            "coredns": ("llm2llm-node:coredns", ""),
            "kuberay": ("llm2llm-node:kuberay-operator", ""),
        }
        self._tokens = {k: secrets.token_hex(16) for k in users}
        lines = [f'{self._tokens[k]},{user},{k}' + (f',"{group}"' if group else "") for k, (user, group) in users.items()]
        tokens = self.conf / "tokens.csv"
        tokens.write_text("\n".join(lines) + "\n")
        tokens.chmod(0o600)
        for k in users:
            path = self.kubeconfig if k == "admin" else self.conf / f"{k}.kubeconfig"
            path.write_text(textwrap.dedent(f"""\
                apiVersion: v1
                kind: Config
                clusters:
                - name: llm2llm-node
                  cluster: {{server: "{self.server}", certificate-authority: "{p / 'ca.crt'}"}}
                users:
                - name: {k}
                  user: {{token: "{self._tokens[k]}"}}
                contexts:
                - name: llm2llm-node
                  context: {{cluster: llm2llm-node, user: {k}}}
                current-context: llm2llm-node
                """))
            path.chmod(0o600)
        self._lap("certificates")

    def _kc_flags(self, name: str) -> list[str]:
        kc = self.conf / f"{name}.kubeconfig"
        return [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}"]

    def _configs(self) -> None:
        dns_health, dns_ready, kr_metrics, kr_health = free_ports(4)
        self._ports = {"dns_ready": dns_ready, "kuberay_metrics": kr_metrics, "kuberay_health": kr_health}
        write_configs(self.conf, self.pki, self.workdir, dns_health, dns_ready)

    def _bootstrap_objects(self) -> None:
        """RBAC for CoreDNS and KubeRay, the kube-dns Service in front of the host's CoreDNS, KubeRay's CRDs."""
        kuberay = kuberay_module()
        manifests = self.conf / "bootstrap.yaml"
        manifests.write_text(bootstrap_manifest())
        self.kubectl("apply", "-f", manifests)
        self.kubectl("apply", "-f", kuberay / "config" / "rbac" / "role.yaml")
        # KubeRay's CRDs exceed the 256 KiB last-applied annotation of a client-side apply.
        self.kubectl("apply", "--server-side", "-f", kuberay / "config" / "crd" / "bases")
        for crd in ("rayjobs.ray.io", "rayclusters.ray.io"):
            self._wait(lambda: self.kubectl("get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=="
                                            "'Established')].status}", check=False).stdout.strip() == "True",
                       f"CRD {crd} established", time.monotonic() + 60)

    def _node_ready(self) -> bool:
        res = self.kubectl("get", "node", NODE_NAME, "-o",
                           "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
        return res.returncode == 0 and res.stdout.strip() == "True"

    # --- images --------------------------------------------------------------------------------

    def load_images(self, images: tuple[str, ...] | list[str]) -> list[str]:
        """Imports docker images into the node's containerd unless the same image is there already.
        The pause image is built from pause/ first if docker does not have it. Returns what was imported."""
        loaded = []
        for image in images:
            if image == PAUSE_IMAGE:
                _ensure_pause_image(self.bin_dir or build_binaries(["pause"]))
            docker_id = _run("docker", "image", "inspect", "-f", "{{.Id}}", image, check=False)
            if docker_id.returncode != 0:
                raise NodeError(f"image {image} is not in docker: build it first (make images)")
            # docker's image id is the config digest: the same id under the same name is the same image.
            if docker_id.stdout.strip() == self._ctr_config_digest(image) and self._unpacked(image):
                continue
            t0 = time.monotonic()
            for tries in (1, 2):
                save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
                res = subprocess.run(["ctr", f"--address={CONTAINERD_SOCK}", "-n", "k8s.io", "images", "import",
                                      "-"], stdin=save.stdout, capture_output=True, text=True)
                save.stdout.close()
                if save.wait() == 0 and res.returncode == 0:
                    break
                # Seen once: the unpack failed on a parent snapshot that the kubelet's image GC had just
                # removed; the image was recorded but not unpacked. A second import unpacks it again.
                if tries == 2 or "snapshot" not in res.stderr:
                    raise NodeError(f"importing {image} into the node failed: {res.stderr.strip()[-2000:]}")
            loaded.append(image)
            print(f"node: imported {image} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        return loaded

    def _unpacked(self, image: str) -> bool:
        """containerd has the image's layers unpacked for its snapshotter (a pod can start from it)."""
        out = self._ctr("images", "check", f"name=={_full_name(image)}", check=False).stdout.splitlines()
        return len(out) >= 2 and out[1].split()[-1] == "true"

    def _ctr_config_digest(self, image: str) -> str:
        """The config digest (docker's image id) of the image containerd has under that name, or ''."""
        out = self._ctr("images", "ls", f"name=={_full_name(image)}", check=False).stdout.splitlines()
        if len(out) < 2:
            return ""
        manifest = out[1].split()[2]
        blob = self._ctr("content", "get", manifest, check=False).stdout
        try:
            data = json.loads(blob)
        except ValueError:
            return ""
        if "manifests" in data:  # an index: take the amd64 manifest
            sub = next((m["digest"] for m in data["manifests"]
                        if (m.get("platform") or {}).get("architecture") in (None, "amd64")), None)
            if sub is None:
                return ""
            data = json.loads(self._ctr("content", "get", sub, check=False).stdout or "{}")
        return (data.get("config") or {}).get("digest", "")

    def _ctr(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ctr", f"--address={CONTAINERD_SOCK}", "-n", "k8s.io", *args, check=check)

    # --- helpers -------------------------------------------------------------------------------

    def kubectl(self, *args, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        if self._kubectl is None:
            self._kubectl = kubetools_bin() / "kubectl"
        res = _run(self._kubectl, f"--kubeconfig={self.kubeconfig}", *args, check=False, input=input)
        if check and res.returncode != 0:
            raise NodeError(f"kubectl {' '.join(map(str, args))}: {res.stderr.strip()}")
        return res

    def _spawn(self, name: str, argv: list) -> None:
        argv = [str(a) for a in argv]
        exe = shutil.which(argv[0]) or argv[0]
        with open(self.logs / f"{name}.log", "ab") as out:
            # A new session: the node outlives the CLI that started it, and no terminal signal reaches it.
            proc = subprocess.Popen([exe, *argv[1:]], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=STATE_DIR, start_new_session=True)
        self.pids[name] = {"pid": proc.pid, "exe": os.path.realpath(exe)}
        STATE_FILE.write_text(json.dumps({"dir": str(self.workdir), "pids": self.pids,
                                          "kubeconfig": str(self.kubeconfig)}))
        self._lap(f"{name} started")

    def _wait(self, ok, what: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            for name, entry in self.pids.items():
                if not _alive(entry["pid"]):
                    raise NodeError(f"{name} exited while waiting for {what}; {self.logs / name}.log:\n"
                                    f"{tail(self.logs / f'{name}.log')}")
            if ok():
                self._lap(what)
                return
            time.sleep(0.5)
        raise NodeError(f"timed out waiting for {what}")

    def _wait_http(self, url: str, what: str, deadline: float, token: str | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt")) if url.startswith("https") else None

        def ok() -> bool:
            req = urllib.request.Request(url)
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    return resp.status == 200
            except (OSError, ssl.SSLError):
                return False

        self._wait(ok, what, deadline)

    # --- teardown ------------------------------------------------------------------------------

    def _delete_workloads(self) -> None:
        """Stop controllers first (nothing recreates pods), then delete every pod so the kubelet tears
        down each sandbox (CNI DEL, unmounts) itself."""
        if "kube-apiserver" not in self.pids or not self.kubeconfig.exists():
            return
        for name in ("ray-operator", "kube-controller-manager"):
            entry = self.pids.pop(name, None)
            if entry:
                _stop_pid(entry["pid"], entry["exe"])
        if "kubelet" in self.pids:
            self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=3", "--wait=false",
                         check=False)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if not self._ctr("tasks", "ls", "-q", check=False).stdout.strip():
                    break
                time.sleep(1)

    def _remove_containers(self) -> None:
        """What the kubelet did not remove: kill tasks and delete containers in containerd's k8s.io."""
        if "containerd" not in self.pids:
            return
        for task in self._ctr("tasks", "ls", "-q", check=False).stdout.split():
            self._ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(0.5)
        for task in self._ctr("tasks", "ls", "-q", check=False).stdout.split():
            self._ctr("tasks", "delete", "-f", task, check=False)
        for c in self._ctr("containers", "ls", "-q", check=False).stdout.split():
            self._ctr("containers", "delete", c, check=False)

    def _kill_shims(self) -> None:
        for pid, _cmd in node_processes():
            exe = _exe(pid)
            if exe:
                _stop_pid(pid, exe, timeout=5)

    def _unmount(self) -> None:
        for point in sorted(node_mounts(self.workdir), key=lambda p: p.count("/"), reverse=True):
            if _run("umount", point, check=False).returncode != 0:
                _run("umount", "-l", point, check=False)
        for ns in Path("/run/netns").glob("cni-*") if Path("/run/netns").exists() else ():
            ns.unlink(missing_ok=True)

    def _clean_network(self) -> None:
        if self.bin_dir is None:
            self.bin_dir = Path(build_binaries(["kube-proxy"]))
        kp = self.bin_dir / "kube-proxy"
        if kp.exists():
            _run(kp, "--cleanup", check=False)
        before_file = self.workdir / "iptables.before.json"
        before = json.loads(before_file.read_text()) if before_file.exists() else {}
        remove_iptables_additions(before)
        if bridge_exists():
            for line in _run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout.splitlines():
                veth = line.split(":")[1].strip().split("@")[0]
                _run("ip", "link", "del", veth, check=False)
            _run("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(f"/var/lib/cni/networks/{CNI_NETWORK}", ignore_errors=True)
        for f in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*") if Path("/var/lib/cni/results").exists() else ():
            f.unlink(missing_ok=True)


def remove_iptables_additions(before: dict[str, list[str]]) -> None:
    """Removes what the node added since ``before``: its own rule, and the KUBE-*/CNI-* chains and the
    rules that jump to them (the kubelet, kube-proxy and the CNI plugins leave some behind)."""
    after = iptables_rules()
    for key, entries in after.items():
        family, table = key.split("/")
        old = set(before.get(key, []))
        rules = [e for e in entries if e.startswith("-A ") and e not in old]
        chains = [e[1:] for e in entries if e.startswith(":") and e not in old and _OWNED_CHAINS.match(e[1:])]
        for rule in rules:
            words = shlex.split(rule)
            if RULE_COMMENT in rule or any(_OWNED_CHAINS.match(w) for w in words[1:]):
                _run(family, "-t", table, "-D", *words[1:], check=False)
        for chain in chains:
            _run(family, "-t", table, "-F", chain, check=False)
        for chain in chains:
            _run(family, "-t", table, "-X", chain, check=False)


def kuberay_module() -> Path:
    """KubeRay's Go module source (downloaded by build.sh): its CRDs and the operator's ClusterRole."""
    env = dict(line.split("=", 1) for line in (HERE / "versions.env").read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    version = env["KUBERAY_VERSION"]
    res = _run("go", "mod", "download", "-json", f"github.com/ray-project/kuberay/ray-operator@{version}",
               cwd=HERE)
    return Path(json.loads(res.stdout)["Dir"])


def _full_name(image: str) -> str:
    """containerd's name for a docker reference (docker.io/library/ is implied by docker)."""
    first = image.split("/")[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def _ensure_pause_image(bins: Path) -> None:
    if _run("docker", "image", "inspect", PAUSE_IMAGE, check=False).returncode == 0:
        return
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(bins / "pause", arcname="pause")
    _run("docker", "import", "--change", 'ENTRYPOINT ["/pause"]', "-", PAUSE_IMAGE, input=buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the node up (detached); prints `export KUBECONFIG=...`")
    up.add_argument("--dir", required=True, help="work dir: PKI, kubeconfigs, logs, etcd data, kubelet root")
    up.add_argument("--timeout", type=float, default=300.0)
    up.add_argument("--image", action="append", default=[], help="a docker image to import (repeatable)")
    sub.add_parser("down", help="stop the node and remove everything it added (images are kept)")
    load = sub.add_parser("load", help="import docker images into the running node")
    load.add_argument("images", nargs="+")
    sub.add_parser("status", help="print the KUBECONFIG of the running node, or exit 1 (none, or its processes gone)")
    args = ap.parse_args(argv)
    if args.command == "up":
        try:
            node = Node(args.dir).start(args.timeout, tuple(args.image))
        except NodeError as err:
            print(f"node: {err}", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={node.kubeconfig}")
    elif args.command == "down":
        state = _read_state()
        if state is None:
            print("node: no node is up", file=sys.stderr)
            return 0
        Node(state["dir"]).stop()
        print("node: down", file=sys.stderr)
    elif args.command == "load":
        state = _live_state()
        if state is None:
            print("node: no node is up; images are imported at `up`", file=sys.stderr)
            return 1
        try:
            Node(state["dir"]).load_images(args.images)
        except NodeError as err:
            print(f"node: {err}", file=sys.stderr)
            return 1
    else:
        state = _live_state()
        if state is None:
            return 1
        print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
