"""A teacher key goes only where its owner pinned it. The attacker's moves, each refused, plus the honest
cases that must keep working: the parser and comparison (llm2llm.endpoints), the operator's check of the
Secret, and the job's OpenAI client against a real HTTP server on loopback that records what it was sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm2llm import endpoints
from llm2llm.spec import parse_spec

PIN = "https://llm.example.com/v1"


@pytest.mark.parametrize("url", [
    "https://llm.example.com@attacker.example/v1",      # userinfo: the host is attacker.example
    "https://llm.example.com:443@attacker.example/v1",
    "https://llm.example.com%40attacker.example/v1",    # encoded @: not a host name
    "https://llm.example.com.attacker.example/v1",      # a longer host that starts with the pinned one
    "https://llm.example.com:8443/v1",                  # another port
    "http://llm.example.com/v1",                        # downgrade to plain http
    "https://llm.example.com/v1x",                      # a sibling path, not below /v1
    "https://llm.example.com/v2",
    "https://llm.example.com/v1/../../admin",           # dot segments (servers normalise them away)
    "https://llm.example.com/v1/%2e%2e/admin",
    "https://llm.example.com/v1%2f..%2fadmin",
    "https://llm.example.com\\@attacker.example/v1",    # backslash: WHATWG parsers read it as /
    "https://llm.example.com/v1 https://attacker.example",
    "https://llm.example.com/v1?redirect=https://attacker.example",
    "https://llm.example.com/v1#x",
    "https://xn--llm-example-.com/v1", "https://llm.exаmple.com/v1",  # a Cyrillic a
    "ftp://llm.example.com/v1", "//llm.example.com/v1", "llm.example.com/v1", "",
])
def test_attacker_endpoints_are_refused(url):
    assert endpoints.check(url, PIN) is not None


@pytest.mark.parametrize("url", [
    "https://llm.example.com/v1", "https://llm.example.com/v1/", "https://LLM.Example.COM/v1/chat",
    "https://llm.example.com:443/v1",
])
def test_pinned_endpoints_are_allowed(url):
    assert endpoints.check(url, PIN) is None


def test_no_pin_means_no_key_and_pins_are_parsed_too():
    assert "not pinned" in endpoints.check(PIN, None)
    assert "not pinned" in endpoints.check(PIN, "  ")
    assert "do not parse" in endpoints.check(PIN, "https://user@llm.example.com/v1")
    # A root pin covers the host; several pins, by comma or space.
    assert endpoints.check("https://a.example/any/path", "https://a.example") is None
    assert endpoints.check("http://10.0.0.5:8000/v1", "https://a.example/v1, http://10.0.0.5:8000") is None
    assert endpoints.check("http://[::1]:8000/v1", "http://[::1]:8000/v1") is None


# --- the operator: the Secret's own annotation is the pin ------------------------------------------------

def _reconcile(tmp_path, endpoint, annotation):
    from tests.unit.test_operator_reconcile import OPTED_IN, FakeCore, _body, _ctx, reconcile

    core = FakeCore(secrets={"s": {"k": "eA=="}}, secret_meta={"s": (OPTED_IN, annotation)})
    ctx = _ctx(core)
    out = reconcile(_body(tmp_path, teacher={"kind": "openai", "endpoint": endpoint,
                                             "apiKeySecretRef": {"name": "s", "key": "k"}}), ctx)
    return out, ctx, core


@pytest.mark.parametrize("endpoint,annotation", [
    ("https://llm.example.com@attacker.example/v1", {"llm2llm.io/allowed-endpoints": PIN}),
    ("https://llm.example.com.attacker.example/v1", {"llm2llm.io/allowed-endpoints": PIN}),
    ("https://attacker.example/v1", None),  # opted in but pinned nowhere
])
def test_operator_refuses_a_key_for_an_endpoint_its_owner_did_not_pin(tmp_path, endpoint, annotation):
    out, ctx, _ = _reconcile(tmp_path, endpoint, annotation)
    assert out.invalid is not None and out.invalid.reason == "EndpointNotAllowed" and ctx.custom.jobs == {}


def test_operator_lists_secrets_by_opt_in_label_only(tmp_path):
    out, ctx, core = _reconcile(tmp_path, PIN + "/chat", {"llm2llm.io/allowed-endpoints": PIN})
    assert out.invalid is None and out.submitted
    assert core.listed == [("ns", "llm2llm.io/teacher-key=true", "metadata.name=s")]


# --- the job: the client itself never sends a key that is not pinned ---------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "Question: q\nAnswer: #### 1"}}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _ask(endpoint, key, pins, monkeypatch):
    pytest.importorskip("openai")
    from llm2llm_jobs.fanout import teach_shard

    monkeypatch.setenv("LLM2LLM_TEACHER_API_KEY", key)
    if pins is None:
        monkeypatch.delenv("LLM2LLM_TEACHER_API_KEY_ENDPOINTS", raising=False)
    else:
        monkeypatch.setenv("LLM2LLM_TEACHER_API_KEY_ENDPOINTS", pins)
    spec = parse_spec({"data": {"seed": "/s"}, "output": "/o", "teacher": {
        "kind": "openai", "endpoint": endpoint, "model": "m", "structuredOutput": False, "maxRounds": 1}})
    teach_shard(spec=spec.model_dump(mode="json", by_alias=True), model_path=None,
                failures=[{"id": "f1", "input": "What is 1 + 0?", "output": "#### 1", "prediction": "2"}],
                existing=[], held_out=[], iteration=0, shard=0, token_budget=None,
                api_key_env="LLM2LLM_TEACHER_API_KEY")
    return _Recorder.seen


def test_ambient_key_without_a_pin_is_never_sent(server, monkeypatch):
    """A Ray pod that carries a key, and a run that leaves apiKeySecretRef out and points teacher.endpoint at
    its own server: the request goes out, the key does not."""
    seen = _ask(server, "sk-ambient-secret", None, monkeypatch)
    assert seen and all(r["auth"] in (None, "Bearer EMPTY") for r in seen)
    assert all(b"sk-ambient-secret" not in r["body"] for r in seen)


def test_key_pinned_elsewhere_is_not_sent_to_the_runs_endpoint(server, monkeypatch):
    seen = _ask(server, "sk-pinned-elsewhere", "https://llm.example.com/v1", monkeypatch)
    assert seen and all("sk-pinned-elsewhere" not in (r["auth"] or "") for r in seen)


def test_pinned_key_is_sent_to_its_endpoint(server, monkeypatch):
    seen = _ask(server, "sk-good", server, monkeypatch)
    assert seen and all(r["auth"] == "Bearer sk-good" for r in seen)
