"""Where a credential may be sent: the endpoints its owner pinned, compared as parsed URLs.

A teacher API key or MLflow credentials travel only to an endpoint listed by whoever holds the credential:
the Secret's ``llm2llm.io/allowed-endpoints`` annotation (the operator passes it on to the job beside the
key), or ``LLM2LLM_TEACHER_API_KEY_ENDPOINTS`` set next to the key itself (a shell, a Ray pod's environment).
A key with no pin is never sent.

URLs are compared part by part, never as strings: scheme and host equal (case-insensitive), port equal
(the scheme's default when absent), and the pin's path a prefix of the endpoint's path at a ``/`` boundary.
Refused outright, in pins and endpoints alike: user info (``https://allowed@attacker``), backslashes,
whitespace and control characters, dot segments (``/v1/../x``, also percent-encoded), queries, fragments and
non-ASCII hosts (IDNA must be written as punycode), any of which different parsers read differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

ENDPOINTS_ANNOTATION = "llm2llm.io/allowed-endpoints"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_BAD_CHARS = re.compile(r"[\s\\\x00-\x1f\x7f]")
_HOST = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)$")


class EndpointError(ValueError):
    """A URL that cannot safely be compared (or is not an http(s) endpoint at all)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str  # without a trailing slash; "" is the root

    def covers(self, other: Endpoint) -> bool:
        """``other`` is this endpoint or below it."""
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port) and (
            other.path == self.path or other.path.startswith(self.path + "/"))

    def __str__(self) -> str:
        port = "" if _DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path or '/'}"


def parse_endpoint(url: str) -> Endpoint:
    if not isinstance(url, str) or not url:
        raise EndpointError("empty URL")
    if _BAD_CHARS.search(url):
        raise EndpointError(f"{url!r}: whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise EndpointError(f"{url!r}: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise EndpointError(f"{url!r}: only http and https endpoints")
    if "@" in parts.netloc:
        raise EndpointError(f"{url!r}: user info in the URL")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise EndpointError(f"{url!r}: a query or fragment")
    host = (parts.hostname or "").lower()
    if not host or not _HOST.match(host if not parts.netloc.startswith("[") else f"[{host}]"):
        raise EndpointError(f"{url!r}: not a plain host name or IP address")
    path = parts.path
    segments = unquote(path).split("/")
    if any(s in (".", "..") for s in segments) or "%2f" in path.lower():
        raise EndpointError(f"{url!r}: dot segments or encoded slashes in the path")
    return Endpoint(scheme, host, port if port is not None else _DEFAULT_PORTS[scheme], path.rstrip("/"))


def parse_pins(text: str | None) -> list[Endpoint]:
    """A pin list: URLs separated by commas or whitespace. Raises EndpointError naming the bad one."""
    return [parse_endpoint(p) for p in re.split(r"[,\s]+", text or "") if p]


def check(url: str | None, pins: str | None) -> str | None:
    """Why a credential must not be sent to ``url`` under ``pins``, or None when it may."""
    if not pins or not pins.strip():
        return "the credential is not pinned to any endpoint"
    try:
        allowed = parse_pins(pins)
    except EndpointError as err:
        return f"the pinned endpoints do not parse: {err}"
    try:
        target = parse_endpoint(url or "")
    except EndpointError as err:
        return f"the endpoint is refused: {err}"
    if any(p.covers(target) for p in allowed):
        return None
    return f"{target} is not among the pinned endpoints ({', '.join(str(p) for p in allowed)})"
