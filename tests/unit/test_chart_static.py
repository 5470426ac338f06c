"""The chart's static contract, without helm or an API server:

- its CRD is the generated one (one source: the models);
- its RBAC (files/rbac-rules.yaml, the one source of the chart's rules) grants exactly the Kubernetes calls
  that the operator's code makes, found by scanning operator/llm2llm_operator/*.py: every kubernetes-client
  call (resolved to verb + resource through the client's own generated request paths), the resources Kopf
  handlers are registered on, Kopf's Events, and the blockOwnerDeletion ownerReferences. A new call without a
  rule, or a rule nothing uses, fails here; tests/e2e/test_chart.py proves the same against a real API server;
- values.yaml documents its keys, and the GitOps example points at things that exist.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm2llm.crd import crd_yaml
from tests.conftest import REPO

CHART = REPO / "charts" / "llm2llm-operator"
RULES_FILE = CHART / "files" / "rbac-rules.yaml"
OPERATOR_SRC = REPO / "operator" / "llm2llm_operator"
KOPF_HANDLER_DECORATORS = {"resume", "create", "update", "delete", "field", "event", "timer", "daemon", "index"}
KOPF_EVENT_FUNCS = {"event", "info", "warn", "exception"}

Perm = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


# --- CRDs ----------------------------------------------------------------------------------------

def test_chart_crds_are_the_generated_crds():
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (REPO / "crds").iterdir())
    for name in chart_crds:
        text = (CHART / "crds" / name).read_text()
        assert text == (REPO / "crds" / name).read_text(), \
            f"charts/llm2llm-operator/crds/{name} differs from crds/: run scripts/sync-chart.sh"
    assert (CHART / "crds" / "llm2llm.io_augmentationruns.yaml").read_text() == crd_yaml(), \
        "the CRD is stale: run `make crds` then scripts/sync-chart.sh"


# --- RBAC: the rules file against the operator's code --------------------------------------------

def rules_file() -> dict[str, Any]:
    return yaml.safe_load(RULES_FILE.read_text())


def expand(rules: list[dict[str, Any]]) -> set[Perm]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@functools.cache
def _api_classes() -> list[type]:
    import kubernetes.client as kc

    return [c for c in (getattr(kc, n) for n in dir(kc))
            if inspect.isclass(c) and c.__module__.startswith("kubernetes.client.api.")]


@functools.cache
def _client_method(name: str) -> tuple[tuple[str, str, inspect.Signature], ...]:
    """A generated kubernetes-client API method by name: ((HTTP method, path template, signature), ...), one
    entry per API class that has it; () when no API class has a method of that name."""
    out = []
    for cls in _api_classes():
        fn, serialize = getattr(cls, name, None), getattr(cls, f"_{name}_serialize", None)
        if name.startswith("_") or not inspect.isfunction(fn) or serialize is None:
            continue
        src = inspect.getsource(serialize)
        method = re.search(r"method='(\w+)'", src)
        path = re.search(r"resource_path='([^']+)'", src)
        assert method and path, f"cannot read the request of {cls.__name__}.{name}"
        out.append((method.group(1), path.group(1), inspect.signature(fn)))
    return tuple(out)


def _request_perm(http: str, path: str, params: dict[str, Any], watch: bool) -> Perm:
    """(group, resource, verb) of one request, as the RBAC authorizer sees it."""
    parts = [params.get(p[1:-1], p) if p.startswith("{") else p for p in path.strip("/").split("/")]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    resource, named = rest[0], len(rest) > 1
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(http)
    if http == "GET":
        verb = "watch" if watch else ("get" if named else "list")
    elif http == "DELETE":
        verb = "delete" if named else "deletecollection"
    assert verb, (http, path)
    return group, resource, verb


class _Scanner(ast.NodeVisitor):
    """Collects the permissions one operator module needs. Names (GROUP, PLURAL, ...) are resolved through
    the imported module's globals: the same values the code uses at run time."""

    def __init__(self, module: Any, path: Path):
        self.module, self.path = module, path
        self.perms: dict[Perm, list[str]] = {}
        self.problems: list[str] = []

    def _value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and hasattr(self.module, node.id):
            return getattr(self.module, node.id)
        if isinstance(node, ast.JoinedStr):
            return "".join(str(self._value(v.value) if isinstance(v, ast.FormattedValue) else v.value)
                           for v in node.values)
        return None

    def _add(self, perm: Perm, node: ast.AST, why: str) -> None:
        self.perms.setdefault(perm, []).append(f"{self.path.name}:{node.lineno} {why}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else None
        dotted = ast.unparse(func)
        if name and _client_method(name):
            self._client_call(node, name)
        elif re.fullmatch(r"kopf\.(on\.\w+|timer|daemon|index)", dotted) and name in KOPF_HANDLER_DECORATORS:
            self._kopf_handler(node, dotted)
        elif dotted in {f"kopf.{f}" for f in KOPF_EVENT_FUNCS}:
            self._add(("", "events", "create"), node, dotted)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        keys = [self._value(k) if k is not None else None for k in node.keys]
        if "blockOwnerDeletion" in keys:
            fields = {k: v for k, v in zip(keys, node.values) if isinstance(k, str)}
            if self._value(fields["blockOwnerDeletion"]) is not False:
                api_version, kind = self._value(fields.get("apiVersion")), self._value(fields.get("kind"))
                owner = _plural_of(api_version, kind)
                if owner is None:
                    self.problems.append(f"{self.path.name}:{node.lineno}: ownerReference to {api_version} {kind}")
                else:
                    # OwnerReferencesPermissionEnforcement: setting blockOwnerDeletion needs update on the
                    # owner's finalizers subresource.
                    self._add((owner[0], f"{owner[1]}/finalizers", "update"), node, "blockOwnerDeletion")
        self.generic_visit(node)

    def _client_call(self, node: ast.Call, name: str) -> None:
        candidates = {(h, p) for h, p, _ in _client_method(name)}
        if len(candidates) != 1:
            self.problems.append(f"{self.path.name}:{node.lineno}: {name} is ambiguous: {sorted(candidates)}")
            return
        http, path, sig = _client_method(name)[0]
        params: dict[str, Any] = {}
        positional = [p for p in sig.parameters if p != "self"]
        for pname, arg in zip(positional, node.args):
            params[pname] = arg
        for kw in node.keywords:
            if kw.arg:
                params[kw.arg] = kw.value
        resolved = {}
        for key in re.findall(r"\{(\w+)\}", path):
            if key in ("group", "plural", "version"):
                value = self._value(params[key]) if key in params else None
                if value is None:
                    self.problems.append(f"{self.path.name}:{node.lineno}: cannot resolve {key} of {name}")
                    return
                resolved[key] = value
        watch = "watch" in params and self._value(params["watch"]) is True
        self._add(_request_perm(http, path, resolved, watch), node, name)

    def _kopf_handler(self, node: ast.Call, dotted: str) -> None:
        args = [self._value(a) for a in node.args[:3]]
        if len(args) < 3 or None in args:
            self.problems.append(f"{self.path.name}:{node.lineno}: {dotted} with a resource the scanner cannot resolve")
            return
        group, _version, plural = args
        # Kopf lists and watches the resource, and patches it: its finalizer and (here) progress annotations.
        for verb in ("list", "watch", "patch"):
            self._add((group, plural, verb), node, dotted)


def _plural_of(api_version: Any, kind: Any) -> tuple[str, str] | None:
    from llm2llm import spec

    if api_version == spec.API_VERSION and kind == spec.KIND:
        return spec.GROUP, spec.PLURAL
    return None


def scan_operator() -> tuple[dict[Perm, list[str]], list[str]]:
    perms: dict[Perm, list[str]] = {}
    problems: list[str] = []
    for path in sorted(OPERATOR_SRC.glob("*.py")):
        module = importlib.import_module(f"llm2llm_operator.{path.stem}" if path.stem != "__init__" else "llm2llm_operator")
        scanner = _Scanner(module, path)
        scanner.visit(ast.parse(path.read_text(), str(path)))
        for perm, where in scanner.perms.items():
            perms.setdefault(perm, []).extend(where)
        problems += scanner.problems
    # Kopf itself posts its warnings as Events whenever it runs handlers.
    if any(p[2] == "watch" for p in perms):
        perms.setdefault(("", "events", "create"), []).append("kopf (posting of handler warnings)")
    return perms, problems


def test_scanner_sees_known_calls():
    # The scanner itself: a few calls it must find where they are, resolved to the right permission.
    perms, _ = scan_operator()
    assert any(w.startswith("rayjob.py") and "create_namespaced_custom_object" in w
               for w in perms[("ray.io", "rayjobs", "create")])
    assert any("patch_namespaced_custom_object_status" in w for w in perms[("llm2llm.io", "augmentationruns/status", "patch")])
    assert any("list_namespaced_secret" in w for w in perms[("", "secrets", "list")])
    assert _request_perm("GET", "/apis/{group}/{version}/namespaces/{namespace}/{plural}", {"group": "g", "plural": "p"},
                         watch=True) == ("g", "p", "watch")
    assert _request_perm("DELETE", "/api/v1/namespaces/{namespace}/pods", {}, watch=False) == ("", "pods", "deletecollection")


def test_rbac_rules_are_exactly_what_the_operator_calls():
    perms, problems = scan_operator()
    assert not problems, problems
    granted = expand(rules_file()["rules"] + rules_file()["secrets"])
    missing = {p: perms[p] for p in perms if p not in granted}
    unused = granted - set(perms)
    assert not missing, f"the operator makes calls files/rbac-rules.yaml does not grant: {missing}"
    assert not unused, f"files/rbac-rules.yaml grants what the operator never does: {sorted(unused)}"


def test_rbac_rules_have_no_wildcards_and_one_verb_set_per_resource():
    doc = rules_file()
    every = doc["rules"] + doc["peering"]["clusterwide"] + doc["peering"]["namespaced"]
    seen: set[tuple[str, str]] = set()
    for rule in every:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for key in ("apiGroups", "resources", "verbs"):
            assert rule[key] and "*" not in rule[key], rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                assert (g, r) not in seen, f"{g}/{r} appears in two rules"
                seen.add((g, r))
    assert expand(doc["peering"]["clusterwide"]) == {("kopf.dev", "clusterkopfpeerings", v)
                                                      for v in ("get", "list", "watch", "patch")}
    assert expand(doc["peering"]["namespaced"]) == {("kopf.dev", "kopfpeerings", v)
                                                     for v in ("get", "list", "watch", "patch")}


def test_rbac_template_reads_only_the_rules_file():
    text = (CHART / "templates" / "rbac.yaml").read_text() + (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'Files.Get "files/rbac-rules.yaml"' in text
    assert "verbs:" not in text and "apiGroups:" not in text  # no rule typed into a template


# --- values and metadata -------------------------------------------------------------------------

def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "llm2llm-operator"
    assert chart["kubeVersion"].startswith(">=1.28")
    import llm2llm_operator  # noqa: F401
    from importlib.metadata import version

    assert chart["appVersion"] == version("llm2llm-operator")


def test_every_values_key_is_documented():
    """Each key of values.yaml has a comment: on its line, just above it, above the run of sibling keys it
    belongs to (no blank line between), or above its parent block."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    documented: dict[int, bool] = {}  # indent -> whether the latest key at that indent is documented
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        sibling_run = i > 0 and re.match(rf"^ {{{indent}}}[A-Za-z][\w.-]*:", lines[i - 1]) and documented.get(indent)
        own = "#" in line.split(":", 1)[1] or prev.strip().startswith("#") or bool(sibling_run)
        parent = any(v for k, v in documented.items() if k < indent)
        documented = {k: v for k, v in documented.items() if k < indent}
        documented[indent] = own or parent
        if not (own or parent):
            undocumented.append(line.strip())
    assert not undocumented, undocumented


def test_values_defaults_are_safe():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["watchNamespaces"] == [] and values["replicaCount"] == 1 and not values["peering"]["name"]
    assert values["operator"]["defaultLauncher"] == "rayjob"
    assert {"cpu", "memory"} <= set(values["resources"]["requests"]) and "memory" in values["resources"]["limits"]
    assert values["operator"]["jobPython"].startswith("/")


# --- GitOps example ------------------------------------------------------------------------------

GITOPS = REPO / "examples" / "gitops"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_argocd_applications_point_at_this_repo_layout():
    apps = [d for p in sorted((GITOPS / "argocd").glob("*.yaml")) for d in _docs(p) if d["kind"] == "Application"]
    assert {a["metadata"]["name"] for a in apps} == {"llm2llm-operator", "llm2llm-runs"}
    by_name = {a["metadata"]["name"]: a for a in apps}
    for app in apps:
        assert app["apiVersion"] == "argoproj.io/v1alpha1"
        source = app["spec"]["source"]
        assert (REPO / source["path"]).is_dir(), source["path"]
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    op = by_name["llm2llm-operator"]
    assert op["spec"]["source"]["path"] == "charts/llm2llm-operator"
    values = yaml.safe_load(op["spec"]["source"]["helm"]["valuesObject"]) \
        if isinstance(op["spec"]["source"]["helm"]["valuesObject"], str) else op["spec"]["source"]["helm"]["valuesObject"]
    assert values["watchNamespaces"] == [by_name["llm2llm-runs"]["spec"]["destination"]["namespace"]]
    # The operator (and its CRD) sync before the runs that need them.
    wave = lambda a: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])  # noqa: E731
    assert wave(op) < wave(by_name["llm2llm-runs"])
    runs = by_name["llm2llm-runs"]
    assert runs["spec"]["source"]["path"] == "examples/gitops/runs"
    # Pruning a run deletes it, and its finalizer stops its jobs: never automatic.
    assert runs["spec"]["syncPolicy"]["automated"]["prune"] is False


def test_gitops_runs_are_valid_specs():
    from llm2llm.spec import parse_run

    kustomization = yaml.safe_load((GITOPS / "runs" / "kustomization.yaml").read_text())
    runs = [d for r in kustomization["resources"] for d in _docs(GITOPS / "runs" / r) if d["kind"] == "AugmentationRun"]
    assert 1 <= len(runs) <= 3
    for doc in runs:
        parse_run(doc)  # the operator's own rules
