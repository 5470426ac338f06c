"""Storage layout, atomic writes and stage markers, over fsspec (local folders, s3://, ...).

Layout of one run::

    <output>/<run>/run.json                  the spec the run was started with
    <output>/<run>/data/{seed,test}.parquet  the inputs, normalised (DATASET schema)
    <output>/<run>/iter-<i>/<stage>/...      each stage's files
    <output>/<run>/iter-<i>/train/model/     the trained model (local); model-a<attempt>/ on object stores:
                                             the train marker's ``model_dir`` names it (``trained_model``)
    <output>/<run>/iter-<i>/<stage>/_DONE.json   the stage's commit marker (written last)
    <output>/<run>/iter-<i>/_ITERATION.json  the iteration's figures: its commit marker
    <output>/<run>/status.json               the local runner's copy of the status

A reader trusts a stage only if its marker exists, and a marker is only written after every file of
the stage is complete. Every file is written to a temporary name and renamed into place (local), or
put in one request (object stores, where a PUT is atomic, and so is a multipart upload: the object only
appears at its completion), so a crash never leaves a torn file behind a marker. A folder cannot be
renamed on an object store: one is uploaded key by key into a prefix of its own, checked against its
source, and only then named by a marker (``put_folder``).

On object stores every read asks the store: s3fs keeps directory listings in a per-process cache that
another process's writes (a job's markers, seen by the runner) or this one's libraries (Ray Train lists
through the same filesystem object) would make stale.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any

import fsspec

from .status import IterationStatus

if TYPE_CHECKING:
    import pyarrow as pa

MARKER = "_DONE.json"
ITERATION_MARKER = "_ITERATION.json"

# Fault-injection hook for the job-crash tests (tests/integration/test_job_crash.py): with
# LLM2LLM_PAUSE_BEFORE_MARKER=<stage> (or ``iteration``) the job stops for good right before writing that
# marker, every file of the stage already complete, and logs that it did, so a test can SIGKILL it inside the
# window between a stage's files and its commit (milliseconds for filter or merge: too narrow to hit
# otherwise). With LLM2LLM_PAUSE_SECONDS the pause ends after that long and the job goes on (the real-node
# test kills a pod inside it, and an attempt it did not kill must still finish). Unset, as everywhere but those
# tests, it does nothing.
PAUSE_BEFORE_MARKER_ENV = "LLM2LLM_PAUSE_BEFORE_MARKER"
PAUSE_SECONDS_ENV = "LLM2LLM_PAUSE_SECONDS"

log = logging.getLogger(__name__)


def _pause_before_marker(name: str) -> None:
    if os.environ.get(PAUSE_BEFORE_MARKER_ENV) == name:
        log.warning("pausing before the %s marker (%s is set): waiting to be killed", name, PAUSE_BEFORE_MARKER_ENV)
        limit = float(os.environ.get(PAUSE_SECONDS_ENV) or "inf")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(min(3600.0, max(0.0, deadline - time.monotonic())))


def fsync_dir(path: str) -> None:
    """Make a rename in the local folder ``path`` survive a node crash, not just the renamed bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StorageError(RuntimeError):
    """Output storage cannot be read or written."""


class CorruptFile(StorageError):
    """A file is there but does not hold what it should (torn, or foreign content)."""


class RunStorage:
    """One run's folder: ``<output>/<run>``."""

    def __init__(self, output: str, run_name: str):
        self.output = output
        self.run_name = run_name
        try:
            self.fs, base = fsspec.core.url_to_fs(output)
        except (ImportError, ValueError) as err:
            raise StorageError(f"unsupported output URI {output!r}: {err}") from err
        self.root = posixpath.join(base.rstrip("/"), run_name)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # --- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        """A full URI for status and lineage."""
        p = self.path(*parts)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    def iter_dir(self, i: int) -> str:
        return self.path(f"iter-{i}")

    def stage_dir(self, i: int, stage: str) -> str:
        return self.path(f"iter-{i}", stage)

    def _fresh(self, path: str) -> None:
        """Drop what s3fs's listing cache holds for ``path`` and its parents, so the next call asks the store."""
        if not self.is_local:
            self.fs.invalidate_cache(path)

    # --- atomic writes -------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        try:
            parent = posixpath.dirname(path)
            self.fs.makedirs(parent, exist_ok=True)
            if self.is_local:
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                    fsync_dir(parent)  # the rename itself must survive a node crash, not just the bytes
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            else:
                self.fs.pipe_file(path, data)
        except OSError as err:
            raise StorageError(f"cannot write {path}: {err}") from err

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, path: str) -> Any | None:
        self._fresh(path)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err}") from err
        except (ValueError, RecursionError) as err:  # torn or foreign content (or nested too deep): name the file
            raise CorruptFile(f"corrupt JSON in {path}: {err}") from err

    def write_table(self, path: str, table: pa.Table) -> None:
        # pyarrow on first use only: the operator, which reads markers but never a table, saves its ~45 MiB.
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(path, buf.getvalue())

    def read_table(self, path: str, schema: pa.Schema | None = None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._fresh(path)
        try:
            with self.fs.open(path, "rb") as f:
                t = pq.read_table(f)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err}") from err
        if schema is None:
            return t
        for f in schema:
            # A nullable column this schema gained after the file was written (GENERATED.checks): nulls.
            if f.nullable and f.name not in t.column_names:
                t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
        if set(schema.names) <= set(t.column_names):
            t = t.select(schema.names)
        return t.cast(schema)

    def exists(self, path: str) -> bool:
        self._fresh(path)
        return self.fs.exists(path)

    def list(self, path: str) -> list[str]:
        """The names directly in the folder ``path`` (empty when there is none)."""
        self._fresh(path)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StorageError(f"cannot list {path}: {err}") from err

    def remove(self, path: str) -> None:
        """Remove a file or a whole folder, if there."""
        try:
            if self.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StorageError(f"cannot remove {path}: {err}") from err
        finally:
            self._fresh(path)

    def put_folder(self, local: str, dest: str) -> list[str]:
        """Upload the local folder ``local`` as the folder ``dest``, which must not exist yet (give each attempt
        a name of its own): every file to its own key, one PUT (or one multipart upload) each, so the files land
        exactly at ``dest/<relative path>`` whatever is already there (fsspec's folder put would nest the folder
        under an existing ``dest``). Then ``dest`` is listed and must hold exactly those files at their sizes.
        Returns the relative paths. Not atomic as a whole: a marker written afterwards is the commit."""
        files = {os.path.relpath(os.path.join(d, f), local).replace(os.sep, "/"): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(local) for f in names}
        if not files:
            raise StorageError(f"cannot upload {local} to {dest}: no files in it")
        names = sorted(files)
        try:
            self.fs.put([os.path.join(local, n) for n in names], [posixpath.join(dest, n) for n in names])
            self._fresh(dest)
            found = {posixpath.relpath(p, dest): info["size"] for p, info in self.fs.find(dest, detail=True).items()}
        except OSError as err:
            raise StorageError(f"cannot upload {local} to {dest}: {err}") from err
        finally:
            self._fresh(dest)
        if found != files:
            extra, missing = sorted(set(found) - set(files)), sorted(set(files) - set(found))
            wrong = sorted(n for n in set(found) & set(files) if found[n] != files[n])
            raise StorageError(f"uploaded {dest} does not match {local}: extra {extra}, missing {missing}, "
                               f"wrong size {wrong}")
        return names

    # --- the run's record ----------------------------------------------------------------------
    def run_record(self) -> dict[str, Any] | None:
        """``run.json``: the run's name, uid and the spec it was started with (None before the first write).
        CorruptFile when it is not such a record: its uid names the run's jobs, so it is never guessed."""
        path = self.path("run.json")
        doc = self.read_json(path)
        if doc is not None and not (isinstance(doc, dict) and isinstance(doc.get("uid", ""), str)
                                    and isinstance(doc.get("spec", {}), dict)):
            raise CorruptFile(f"{path} is not a run record (a JSON object with a string uid and a spec object)")
        return doc

    def write_run_record(self, name: str, uid: str, spec_wire: dict[str, Any]) -> None:
        self.write_json(self.path("run.json"), {"name": name, "uid": uid, "spec": spec_wire})

    # --- markers -------------------------------------------------------------------------------
    def mark_done(self, i: int, stage: str, info: dict[str, Any]) -> None:
        _pause_before_marker(stage)
        self.write_json(posixpath.join(self.stage_dir(i, stage), MARKER), info)

    def stage_done(self, i: int, stage: str) -> dict[str, Any] | None:
        """The stage's marker, or None when the stage has not committed."""
        return self.read_json(posixpath.join(self.stage_dir(i, stage), MARKER))

    def trained_model(self, i: int) -> str | None:
        """The URI of iteration ``i``'s committed model folder (the train marker's ``model_dir``), or None."""
        done = self.stage_done(i, "train")
        if done is None:
            return None
        return self.uri(f"iter-{i}", "train", done.get("model_dir", "model"))

    def write_iteration(self, it: IterationStatus) -> None:
        _pause_before_marker("iteration")
        self.write_json(posixpath.join(self.iter_dir(it.index), ITERATION_MARKER), it.model_dump(mode="json", by_alias=True))

    def iteration(self, i: int) -> IterationStatus | None:
        path = posixpath.join(self.iter_dir(i), ITERATION_MARKER)
        doc = self.read_json(path)
        if doc is None:
            return None
        try:
            return IterationStatus.model_validate(doc)
        except ValueError as err:
            raise StorageError(f"corrupt iteration manifest {path}: {err}") from err

    def iterations(self) -> dict[int, IterationStatus]:
        """Committed iterations, contiguous from 0 (a gap means later ones are not trusted)."""
        out: dict[int, IterationStatus] = {}
        i = 0
        while (it := self.iteration(i)) is not None:
            out[i] = it
            i += 1
        return out

    def delete_all(self) -> None:
        self.remove(self.root)
