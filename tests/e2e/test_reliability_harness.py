"""Helpers shared by the reliability e2e tests (no tests here): a kubectl with its own discovery cache, a
recorder of every RayJob ever created (a watch), an RSS sampler, a CPU meter and a health prober for the
operator process, the API server's request counts, and a scanner for secret values. The operator subprocess itself is test_operator_harness.Operator."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import statistics
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.e2e.test_operator_harness import RAY, Operator

LABEL_RUN, LABEL_RUN_UID = "llm2llm.io/run", "llm2llm.io/run-uid"
LABEL_ITERATION, LABEL_ATTEMPT = "llm2llm.io/iteration", "llm2llm.io/attempt"


def start_operator(cluster, log: Path, namespace: str, *args: str, interval: float = 1) -> Operator:
    """One operator subprocess watching `namespace` (stop it yourself)."""
    return Operator(cluster.kubeconfig, log, ["--namespace", namespace, "--interval", str(interval), *args]).start()


class Kubectl:
    """kubectl against the test control plane with a private discovery cache: a cache filled before our
    CRD was installed makes `apply --server-side` answer "no matches for kind" (seen here)."""

    def __init__(self, cluster, cache_dir: Path):
        self.exe = str(cluster.tools_bin / "kubectl")
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        self.cache_dir = str(cache_dir)

    def __call__(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, "--cache-dir", self.cache_dir, *args], input=input, env=self.env, text=True,
                              capture_output=True, timeout=120)

    def apply(self, namespace: str, docs: Iterable[dict[str, Any]]) -> subprocess.CompletedProcess:
        """`kubectl apply --server-side --validate=strict` of one or more documents (a JSON List)."""
        docs = list(docs)
        body = docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": docs}
        return self("apply", "--server-side", "--validate=strict", "--field-manager=reliability-tests",
                    "-n", namespace, "-f", "-", input=json.dumps(body))


@dataclass
class Seen:
    at: float  # time.monotonic() when the watch delivered ADDED
    name: str
    uid: str
    labels: dict[str, str]
    created: str  # metadata.creationTimestamp


class RayJobRecorder:
    """Every RayJob ever created in a namespace, from a watch (re-established from the last resourceVersion
    when the server ends it). Deletions are recorded too, so a RayJob that existed briefly is never missed."""

    def __init__(self, cluster, namespace: str):
        self.api = client.CustomObjectsApi(cluster.api)
        self.ns = namespace
        self.added: list[Seen] = []
        self.deleted: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rayjobs-{namespace}", daemon=True)

    def __enter__(self) -> "RayJobRecorder":
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the RayJob watch did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        rv = None
        known: set[str] = set()
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = self.api.list_namespaced_custom_object(*RAY[:2], self.ns, RAY[2])
                    rv = listing["metadata"]["resourceVersion"]
                    for item in listing["items"]:
                        self._add(item, known)
                    self._ready.set()
                w = watch.Watch()
                for ev in w.stream(self.api.list_namespaced_custom_object, *RAY[:2], self.ns, RAY[2],
                                   resource_version=rv, timeout_seconds=5, allow_watch_bookmarks=True):
                    obj = ev["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "ADDED":
                        self._add(obj, known)
                    elif ev["type"] == "DELETED":
                        with self._lock:
                            self.deleted.append((time.monotonic(), obj["metadata"]["name"], obj["metadata"]["uid"]))
                    if self._stop.is_set():
                        w.stop()
                        break
            except ApiException as err:
                if err.status == 410:  # too old: list again (ADDED dedups on uid)
                    rv = None
                    continue
                time.sleep(0.2)
            except Exception:  # noqa: BLE001 - a broken stream: reconnect from rv
                time.sleep(0.2)

    def _add(self, obj: dict[str, Any], known: set[str]) -> None:
        meta = obj["metadata"]
        if meta["uid"] in known:
            return
        known.add(meta["uid"])
        with self._lock:
            self.added.append(Seen(time.monotonic(), meta["name"], meta["uid"], dict(meta.get("labels") or {}),
                                   meta.get("creationTimestamp", "")))

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.added)

    def names(self) -> list[str]:
        return [s.name for s in self.snapshot()]


class RssSampler:
    """Peak resident memory of a process (VmRSS from /proc), sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every = pid, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> bool:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]) * 1024)
            return True
        except OSError:  # the process is gone
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.every) and self._sample():
            pass

    def __enter__(self) -> "RssSampler":
        self._sample()  # the baseline, before anything happens
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each named process used between start() and stop(), and the machine's load around it: what
    a latency measured on a shared machine means depends on both."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self.used: dict[str, float] = {}

    def start(self) -> "CpuMeter":
        self._t0, self._load0 = time.monotonic(), os.getloadavg()[0]
        self._c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> "CpuMeter":
        self.wall = time.monotonic() - self._t0
        self.used = {name: round(cpu_seconds(pid) - self._c0[name], 2) for name, pid in self.pids.items()}
        self.load = (round(self._load0, 2), round(os.getloadavg()[0], 2))
        return self

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {sec:.1f}s" for name, sec in self.used.items())
        return f"CPU in {self.wall:.1f}s: {parts}; 1-min load {self.load[0]} -> {self.load[1]} ({os.cpu_count()} cores)"


def apiserver_requests(cp) -> Counter:
    """(verb, resource, subresource) -> requests the API server has answered so far, from its /metrics."""
    req = urllib.request.Request(cp.server + "/metrics", headers={"Authorization": f"Bearer {cp.token}"})
    with urllib.request.urlopen(req, timeout=10, context=ssl.create_default_context(cafile=str(cp.ca_file))) as r:
        text = r.read().decode()
    counts: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line.rsplit(" ", 1)
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            counts[(lab.get("verb"), lab.get("resource"), lab.get("subresource", ""))] += int(float(value))
    return counts


class HealthProber:
    """GETs the operator's liveness endpoint every `every` seconds; records each answer's latency."""

    def __init__(self, port: int, every: float = 0.5, timeout: float = 5.0):
        self.url, self.every, self.timeout = f"http://127.0.0.1:{port}/healthz", every, timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=self.timeout) as r:
                    if r.status != 200:
                        self.failures.append(f"HTTP {r.status}")
                self.latencies.append(time.monotonic() - t0)
            except OSError as err:
                self.failures.append(repr(err))
            self._stop.wait(self.every)

    def __enter__(self) -> "HealthProber":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (f"n={len(values)} min={min(values):.2f}s p50={percentile(values, 50):.2f}s p99={percentile(values, 99):.2f}s "
            f"max={max(values):.2f}s mean={statistics.fmean(values):.2f}s")


@dataclass
class Leak:
    source: str
    needle: str
    context: str


@dataclass
class SecretScanner:
    """Looks for a secret value, and its base64 form (a dumped Secret's data), in text and bytes."""

    value: str
    scanned: dict[str, int] = field(default_factory=dict)  # source -> bytes scanned
    leaks: list[Leak] = field(default_factory=list)

    @property
    def needles(self) -> list[bytes]:
        raw = self.value.encode()
        return list(dict.fromkeys([raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw)]))

    def scan(self, source: str, data: bytes | str) -> int:
        blob = data.encode() if isinstance(data, str) else data
        self.scanned[source] = self.scanned.get(source, 0) + len(blob)
        hits = 0
        for needle in self.needles:
            start = 0
            while (i := blob.find(needle, start)) >= 0:
                hits += 1
                self.leaks.append(Leak(source, needle.decode(), blob[max(0, i - 80): i + len(needle) + 80]
                                       .decode(errors="replace")))
                start = i + 1
        return hits
