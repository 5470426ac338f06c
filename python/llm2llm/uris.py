"""Whether this installation can serve the URIs of a spec: a scheme needs an fsspec driver installed.

``llm2llm validate``, ``llm2llm run`` and the operator ask before anything is launched, so a ``gs://`` seed
without gcsfs, or a mistyped ``foo://`` output, is refused with the field's name and the missing package
rather than failing later inside a job. Nothing is opened or contacted: only the drivers are looked up.
"""

from __future__ import annotations

import re

import fsspec

from .spec import AugmentationRunSpec

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")


class UnsupportedURI(ValueError):
    """A spec field holding a URI that no installed fsspec driver serves. ``field`` is its path under spec."""

    def __init__(self, field: str, uri: str, why: str):
        self.field = field
        self.uri = uri
        self.why = why
        super().__init__(f"spec.{field}: {uri!r}: {why}")


def driver_problem(uri: str) -> str | None:
    """Why no installed fsspec driver can serve ``uri``, or None when one can (local paths always can).

    Chained URIs (``simplecache::s3://bucket/x``) need a driver for every link."""
    for link in uri.split("::"):
        if "://" not in link:
            continue  # a local path (or the path part of a chain)
        scheme = link.split("://", 1)[0]
        if not _SCHEME.match(scheme):
            return f"{scheme + '://'!r} is not a URI scheme (letters, digits, '+', '-' or '.', starting with a letter)"
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError as err:  # fsspec knows the scheme; its driver package is not installed here
            return f"no driver for {scheme}:// is installed here: {err}"
        except ValueError:
            hint = f" (schemes are lowercase: {scheme.lower()}://)" if scheme != scheme.lower() and \
                _known(scheme.lower()) else ""
            return f"unknown URI scheme {scheme!r}: no fsspec driver serves {scheme}://{hint}"
    return None


def _known(scheme: str) -> bool:
    return scheme in fsspec.available_protocols()


def unsupported_uris(spec: AugmentationRunSpec) -> list[UnsupportedURI]:
    """Every URI field of ``spec`` (data.seed, data.test, output) that this installation cannot serve."""
    out = []
    for field, uri in (("data.seed", spec.data.seed), ("data.test", spec.data.test), ("output", spec.output)):
        why = driver_problem(uri) if uri else None
        if why:
            out.append(UnsupportedURI(field, uri, why))
    return out


def check_uris(spec: AugmentationRunSpec) -> None:
    """Raise the first UnsupportedURI of ``spec``, if any."""
    problems = unsupported_uris(spec)
    if problems:
        raise problems[0]
