"""The ``llm2llm`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .spec import SpecError, load_run

EXIT_INVALID = 2


def _validate(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    problems = _check_data(run, read=args.check_data)
    if problems:
        print(f"{args.file}: invalid AugmentationRun:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.file}: valid AugmentationRun {run.metadata.name!r}")
    return 0


def _check_data(run, read: bool = True) -> list[str]:
    """Before anything is launched: every URI needs an installed fsspec driver, and (``read``) local data
    files must be readable with every row used (up to seedLimit/testLimit) fitting the task."""
    from .data import DataError, load_examples
    from .runner import localize
    from .uris import unsupported_uris

    problems = [str(bad) for bad in unsupported_uris(run.spec)]
    if problems or not read:
        return problems
    run = localize(run)
    d = run.spec.data
    for field, uri, limit in (("spec.data.seed", d.seed, d.seed_limit), ("spec.data.test", d.test, d.test_limit)):
        if uri and "://" not in uri:
            try:
                load_examples(uri, d.input_field, d.output_field, "check", limit, task=run.spec.task)
            except DataError as err:
                problems += [f"{field}: {p}" for p in err.problems]
    return problems


def _ray_problem(address: str) -> str | None:
    """Why the Ray cluster at ``address`` cannot take jobs, or None. Asked before the run starts, so that a
    mistyped or unreachable address is one line rather than a traceback from inside Ray."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        return "llm2llm run needs Ray: pip install 'llm2llm[local]'"
    try:
        JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - ValueError, ConnectionError, RpcError...: each means "not usable"
        return f"the Ray cluster at {address!r} cannot be reached: {err}"
    return None


def _run(args: argparse.Namespace) -> int:
    from .control import Transient
    from .localray import RayStartError
    from .runner import LocalRunner, RunFailed, format_table, localize
    from .storage import CorruptFile, RunStorage, StorageError

    try:
        run = load_run(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    problems = _check_data(run)
    if problems:
        print(f"{args.file}: invalid AugmentationRun:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return EXIT_INVALID
    try:  # a run folder from an earlier start: its record must hold, or the run cannot resume as itself
        RunStorage(localize(run).spec.output, run.metadata.name).run_record()
    except StorageError as err:
        hint = "; move it away to start the run afresh (new job names)" if isinstance(err, CorruptFile) else ""
        print(f"llm2llm: cannot run {run.metadata.name!r}: {err}{hint}", file=sys.stderr)
        return EXIT_INVALID
    address = args.address or run.spec.ray.address
    problem = _ray_problem(address) if address else None
    if problem:
        where = "--address" if args.address else "spec.ray.address"
        print(f"llm2llm: cannot run {run.metadata.name!r}: {problem} ({where})", file=sys.stderr)
        return 1
    runner = LocalRunner(run, address=args.address)
    print(f"llm2llm: run {run.metadata.name!r} -> {runner.store.uri()}", flush=True)
    try:
        status = runner.execute()
    except (RayStartError, RunFailed, Transient) as err:
        # The embedded Ray head did not come up, the given one cannot be reached, or the run cannot go on as
        # written (its status.json says why too): say so, no traceback.
        print(f"llm2llm: cannot run {run.metadata.name!r}: {err}", file=sys.stderr)
        return 1
    print(format_table(status))
    print(f"status: {runner.store.uri('status.json')}")
    return 0 if status.phase in ("Succeeded", "Suspended") else 1


def _status(args: argparse.Namespace) -> int:
    from .runner import format_table
    from .status import RunStatus
    from pydantic import ValidationError

    from .storage import RunStorage, StorageError

    uri = args.run_dir.rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name:
        print(f"llm2llm status: {args.run_dir!r} is not a run folder (<output>/<run>)", file=sys.stderr)
        return EXIT_INVALID
    try:
        store = RunStorage(parent or ".", name)
        doc = store.read_json(store.path("status.json"))
        if doc is None and store.exists(store.path("status.json")):
            doc = []  # JSON null: there, but no status (refused below)
    except (StorageError, OSError) as err:  # an unsupported URI, an unreadable or torn status.json
        print(f"llm2llm status: {err}", file=sys.stderr)
        return EXIT_INVALID
    if doc is None:
        print(f"{uri}: no status.json (not a run folder, or the run has not started)", file=sys.stderr)
        return 1
    try:
        status = RunStatus.model_validate(doc)
    except ValidationError as err:  # JSON, but not a status: say where and what, never a traceback
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the document'}: {e['msg']}" for e in err.errors()[:5])
        print(f"llm2llm status: {store.uri('status.json')}: not a run status: {where}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(doc, indent=2) if args.json else format_table(status))
    return 0


def _crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import ReportError, report_uri
    from .storage import StorageError

    try:
        page = report_uri(args.run_dir, args.examples)
    except (ReportError, StorageError) as err:
        print(f"llm2llm report: {err}", file=sys.stderr)
        return 1
    out = args.output or args.run_dir.rstrip("/") + "/report.html"
    if out == "-":
        sys.stdout.write(page)
        return 0
    import fsspec

    try:
        with fsspec.open(out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as err:
        print(f"llm2llm report: cannot write {out}: {err}", file=sys.stderr)
        return 1
    print(f"report: {out}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from .lineage import LineageError, format_lineage, is_run, lineage, open_run
    from .storage import StorageError

    try:
        store = open_run(args.run_dir)
        if not is_run(store):
            print(f"llm2llm lineage: {args.run_dir}: not a run folder", file=sys.stderr)
            return 1
        lin = lineage(store, args.row_id)
    except (LineageError, StorageError) as err:
        print(f"llm2llm lineage: {err}", file=sys.stderr)
        return 1
    print(json.dumps(lin.to_dict(), indent=2, default=str) if args.json else format_lineage(lin))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llm2llm", description="LLM2LLM iterative data augmentation")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run an AugmentationRun locally (one Ray job per iteration)")
    r.add_argument("file")
    r.add_argument("--address", help="Ray dashboard address of an existing cluster (default: start a local Ray)")
    r.set_defaults(fn=_run)
    v = sub.add_parser("validate", help="check a run.yaml; exit code 2 when invalid")
    v.add_argument("file")
    v.add_argument("--no-check-data", dest="check_data", action="store_false", help="skip reading local inputs")
    v.set_defaults(fn=_validate)
    c = sub.add_parser("crd", help="print the AugmentationRun CustomResourceDefinition")
    c.set_defaults(fn=_crd)
    s = sub.add_parser("status", help="print a run's per-iteration table from its folder")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_status)
    rp = sub.add_parser("report", help="write a self-contained HTML report of a run folder")
    rp.add_argument("run_dir", help="the run folder: <output>/<run> (local path or fsspec URI)")
    rp.add_argument("-o", "--output", help="where to write the HTML (default: RUN_DIR/report.html; '-': stdout)")
    rp.add_argument("--examples", type=int, default=3, metavar="N", help="example failures per iteration (default 3)")
    rp.set_defaults(fn=_report)
    ln = sub.add_parser("lineage", help="trace a training row back to its seed row")
    ln.add_argument("run_dir", help="the run folder: <output>/<run> (local path or fsspec URI)")
    ln.add_argument("row_id", help="a row id (or a unique prefix of at least 6 characters)")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(fn=_lineage)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rc = args.fn(args)
    if argv is None and args.cmd == "lineage":
        # As the console script: leave without interpreter teardown. After its output, `lineage` (pyarrow
        # compute over fsspec reads) sometimes aborted in a C++ destructor at exit ("terminate called without
        # an active exception", 4 of 12 runs under load), turning a printed answer into exit code -6. It
        # holds nothing to flush or release but stdio.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
