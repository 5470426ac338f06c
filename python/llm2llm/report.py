"""A run's HTML report: ``llm2llm report RUN_DIR [-o out.html]``.

One self-contained file (plots are PNGs embedded as ``data:`` URIs, CSS inline, no script, no external
asset) built from the run folder alone: the iteration manifests (``iter-<i>/_ITERATION.json``), the status
and spec copies, and for the examples ``iter-<i>/score/scored.parquet`` joined with the filter's kept and
rejected rows by ``parent_id``. Teacher and student text is untrusted: every string is HTML-escaped, and
a Content-Security-Policy forbids scripts should anything ever slip through.

Plots use matplotlib's Agg canvas (``pip install 'llm2llm[report]'``) on ``Figure`` objects, never pyplot,
so rendering has no global state and works in any thread or process.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .lineage import iteration_indices, open_run, read_optional
from .schemas import DATASET, REJECTED, SCORED
from .status import STAGES, IterationStatus, RunStatus
from .control import read_status
from .storage import RunStorage

log = logging.getLogger(__name__)

MAX_TEXT = 1200  # characters of one example text shown before it is clipped
PALETTE = {
    "seed": "#2563eb",
    "test": "#ea580c",
    "fail": "#dc2626",
    "kept": "#16a34a",
    "teacher": "#7c3aed",
    "base": "#94a3b8",
    "prompt": "#0891b2",
    "completion": "#7c3aed",
}
STAGE_COLORS = dict(zip(STAGES, ("#64748b", "#2563eb", "#0891b2", "#14b8a6", "#7c3aed", "#f59e0b", "#84cc16")))
REASON_COLORS = ["#dc2626", "#f97316", "#f59e0b", "#eab308", "#a16207", "#db2777", "#9333ea", "#be123c", "#78716c",
                 "#0f766e"]


class ReportError(RuntimeError):
    """The report cannot be made (not a run folder, matplotlib missing)."""


# --- data ------------------------------------------------------------------------------------------
@dataclass
class Example:
    iteration: int
    failure: dict[str, Any]  # scored row (split seed, correct False)
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunData:
    uri: str
    name: str
    uid: str | None
    spec: dict[str, Any]
    status: RunStatus | None
    iterations: list[IterationStatus]
    seed_rows: int | None
    test_rows: int | None
    examples: list[Example]


def _num_rows(store: RunStorage, rel: str) -> int | None:
    try:
        with store.fs.open(store.path(rel), "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except FileNotFoundError:
        return None


def collect(store: RunStorage, examples_per_iteration: int = 3) -> RunData:
    """Everything the report shows, read from the run folder."""
    run_doc = store.run_record() or {}
    # A torn or foreign status.json is no status: the iterations' own manifests are the report's source.
    status = read_status(store) if store.exists(store.path("status.json")) else None
    manifests = store.iterations()
    iterations = [manifests[i] for i in sorted(manifests)]
    if not iterations and status is not None:
        iterations = list(status.iterations)
    examples: list[Example] = []
    for i in iteration_indices(store):
        examples += _examples(store, i, examples_per_iteration)
    return RunData(
        uri=store.uri(), name=run_doc.get("name") or store.run_name, uid=run_doc.get("uid"),
        spec=run_doc.get("spec") or {}, status=status, iterations=iterations,
        seed_rows=_num_rows(store, "data/seed.parquet"), test_rows=_num_rows(store, "data/test.parquet"),
        examples=examples,
    )


def _examples(store: RunStorage, i: int, limit: int) -> list[Example]:
    if limit <= 0 or store.stage_done(i, "score") is None:
        return []
    scored = read_optional(store, f"iter-{i}/score/scored.parquet", SCORED)
    if scored is None or scored.num_rows == 0:
        return []
    failures = scored.filter(pc.and_(pc.equal(scored["split"], "seed"), pc.invert(scored["correct"])))
    if failures.num_rows == 0:
        return []
    filtered = store.stage_done(i, "filter") is not None
    kept = read_optional(store, f"iter-{i}/filter/kept.parquet", DATASET) if filtered else None
    rejected = read_optional(store, f"iter-{i}/filter/rejected.parquet", REJECTED) if filtered else None
    kept_n, rejected_n = _per_parent(kept), _per_parent(rejected)
    # Failures that taught something first (most kept rows), then those with only rejected candidates;
    # ties keep the scored order, so the choice is deterministic. Only the chosen rows leave Arrow.
    ids = failures["id"].to_pylist()
    order: list[int] = []
    for j in sorted(range(len(ids)), key=lambda j: (-kept_n.get(ids[j], 0), -rejected_n.get(ids[j], 0), j)):
        if len(order) == limit:
            break
        if ids[j] not in {ids[o] for o in order}:  # a seed set may repeat a row (same content id)
            order.append(j)
    chosen = [Example(i, row) for row in failures.take(order).to_pylist()]
    by_parent = {ex.failure["id"]: ex for ex in chosen}
    wanted = pa.array(list(by_parent), pa.string())
    for t, attr in ((kept, "kept"), (rejected, "rejected")):
        if t is None or t.num_rows == 0:
            continue
        for row in t.filter(pc.is_in(t["parent_id"], value_set=wanted)).to_pylist():
            getattr(by_parent[row["parent_id"]], attr).append(row)
    return chosen


def _per_parent(t: pa.Table | None) -> dict[str, int]:
    if t is None or t.num_rows == 0:
        return {}
    counts = t.group_by("parent_id").aggregate([("id", "count")])
    return dict(zip(counts["parent_id"].to_pylist(), counts["id_count"].to_pylist()))


# --- plots -----------------------------------------------------------------------------------------
def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ReportError("the report needs matplotlib: pip install 'llm2llm[report]'") from err
    return Figure, FigureCanvasAgg, MaxNLocator, PercentFormatter


_RC = {
    "font.size": 9.5,
    "axes.titlesize": 10,
    "axes.labelsize": 9.5,
    "axes.edgecolor": "#cbd5e1",
    "axes.labelcolor": "#334155",
    "xtick.color": "#475569",
    "ytick.color": "#475569",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#e2e8f0",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "font.family": "DejaVu Sans",
}


def _plot(draw: Callable[[Any], None], width: float = 6.0, height: float = 3.1) -> str:
    """Draw on a fresh Agg figure; return the PNG as a data URI."""
    import matplotlib

    Figure, FigureCanvasAgg, _, _ = _matplotlib()
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        draw(ax)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _iter_axis(ax, xs: list[int]) -> None:
    _, _, MaxNLocator, _ = _matplotlib()
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs:
        ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#64748b", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _top_legend(ax, ncol: int) -> None:
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=min(ncol, len(handles)), borderaxespad=0.2,
              handlelength=1.2, columnspacing=1.2)


def _count_axis(ax) -> None:
    _, _, MaxNLocator, _ = _matplotlib()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _label_bars(ax, xs: list[int], tops: list[float], fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> None:
    peak = max(tops, default=0) or 1
    for x, v in zip(xs, tops):
        ax.text(x, v + peak * 0.015, fmt(v), ha="center", va="bottom", fontsize=8, color="#334155")
    ax.set_ylim(0, peak * 1.14)


def plot_accuracy(its: list[IterationStatus]) -> str:
    _, _, _, PercentFormatter = _matplotlib()

    def draw(ax):
        xs = [it.index for it in its]
        series = [("seed", "seed (train failures)", [it.seed_accuracy for it in its]),
                  ("test", "held-out test", [it.test_accuracy for it in its])]
        drawn = False
        for key, label, ys in series:
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if not pts:
                continue
            drawn = True
            px, py = zip(*pts)
            ax.plot(px, py, marker="o", lw=2.2, ms=6, color=PALETTE[key], label=label)
            # Seed labels above the points, test labels below, so close values stay readable.
            dy, va = (7, "bottom") if key == "seed" else (-9, "top")
            for x, y in pts:
                ax.annotate(f"{y:.1%}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center", va=va,
                            fontsize=8, color=PALETTE[key])
        if not drawn:
            _empty(ax, "no accuracy recorded yet")
            return
        ax.set_ylim(0, 1.08)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("accuracy")
        _iter_axis(ax, xs)
        ax.legend(loc="lower right")

    return _plot(draw)


def plot_failures(its: list[IterationStatus]) -> str:
    def draw(ax):
        xs, ys = [it.index for it in its], [it.failures for it in its]
        if not xs:
            _empty(ax, "no iteration committed yet")
            return
        ax.bar(xs, ys, width=0.6, color=PALETTE["fail"], alpha=0.85)
        _label_bars(ax, xs, ys)
        ax.set_ylabel("wrong seed answers")
        _count_axis(ax)
        _iter_axis(ax, xs)

    return _plot(draw)


def plot_growth(its: list[IterationStatus], seed_rows: int | None) -> str:
    def draw(ax):
        xs = [it.index for it in its]
        if not xs:
            _empty(ax, "no iteration committed yet")
            return
        base = seed_rows if seed_rows is not None else its[0].train_rows
        seed = [min(base, it.train_rows) for it in its]
        teacher = [max(it.train_rows - base, 0) for it in its]
        ax.bar(xs, seed, width=0.6, color=PALETTE["base"], label="seed rows")
        ax.bar(xs, teacher, width=0.6, bottom=seed, color=PALETTE["teacher"], label="teacher rows")
        _label_bars(ax, xs, [it.train_rows for it in its])
        ax.set_ylabel("training rows")
        _count_axis(ax)
        _iter_axis(ax, xs)
        _top_legend(ax, 2)  # above the axes: inside, it covered the first bar's label

    return _plot(draw)


def _reasons(its: list[IterationStatus]) -> list[str]:
    totals: dict[str, int] = {}
    for it in its:
        for k, v in it.rejected.items():
            totals[k] = totals.get(k, 0) + v
    return sorted(totals, key=lambda k: (-totals[k], k))


def plot_teacher(its: list[IterationStatus]) -> str:
    def draw(ax):
        taught = [it for it in its if it.generated or it.rejected or it.kept]
        if not taught:
            _empty(ax, "the teacher has generated nothing yet")
            return
        xs = [it.index for it in taught]
        bottom = [0.0] * len(taught)
        kept = [it.kept for it in taught]
        ax.bar(xs, kept, width=0.6, color=PALETTE["kept"], label="kept")
        bottom = [b + k for b, k in zip(bottom, kept)]
        for n, reason in enumerate(_reasons(taught)):
            vals = [it.rejected.get(reason, 0) for it in taught]
            ax.bar(xs, vals, width=0.6, bottom=bottom, color=REASON_COLORS[n % len(REASON_COLORS)],
                   label=f"rejected: {reason.replace('_', ' ')}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        tops = [max(it.generated, b) for it, b in zip(taught, bottom)]
        pct = {it.index: (it.kept / it.generated if it.generated else 0.0) for it in taught}
        peak = max(tops, default=0) or 1
        for x, top in zip(xs, tops):
            ax.text(x, top + peak * 0.015, f"{top:,.0f} ({pct[x]:.0%} kept)", ha="center", va="bottom",
                    fontsize=8, color="#334155")
        ax.set_ylim(0, peak * 1.14)
        ax.set_ylabel("teacher candidates")
        _count_axis(ax)
        _iter_axis(ax, [it.index for it in its])
        _top_legend(ax, 3)

    return _plot(draw, height=3.3)


def plot_durations(its: list[IterationStatus]) -> str:
    def draw(ax):
        xs = [it.index for it in its]
        totals = [sum(it.seconds.values()) for it in its]
        if not xs or not any(totals):
            _empty(ax, "no stage timings recorded yet")
            return
        minutes = max(totals) >= 300
        scale, unit = (60.0, "minutes") if minutes else (1.0, "seconds")
        bottom = [0.0] * len(its)
        for stage in STAGES:
            vals = [it.seconds.get(stage, 0.0) / scale for it in its]
            if not any(vals):
                continue
            ax.bar(xs, vals, width=0.6, bottom=bottom, color=STAGE_COLORS[stage], label=stage)
            bottom = [b + v for b, v in zip(bottom, vals)]
        _label_bars(ax, xs, bottom, lambda v: f"{v:,.1f}" if minutes else f"{v:,.0f}")
        ax.set_ylabel(f"wall {unit}")
        _iter_axis(ax, xs)
        _top_legend(ax, 4)

    return _plot(draw, height=3.3)


def plot_tokens(its: list[IterationStatus]) -> str:
    def draw(ax):
        xs = [it.index for it in its]
        prompt = [it.tokens.teacher_prompt for it in its]
        completion = [it.tokens.teacher_completion for it in its]
        if not xs or not any(prompt) and not any(completion):
            _empty(ax, "no teacher tokens used yet")
            return
        ax.bar(xs, prompt, width=0.6, color=PALETTE["prompt"], label="prompt")
        ax.bar(xs, completion, width=0.6, bottom=prompt, color=PALETTE["completion"], label="completion")
        _label_bars(ax, xs, [p + c for p, c in zip(prompt, completion)])
        ax.set_ylabel("teacher tokens")
        _count_axis(ax)
        _iter_axis(ax, xs)
        ax.legend(loc="upper right")

    return _plot(draw)


# --- HTML ------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _int(x: int | float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _clip(text: Any, limit: int = MAX_TEXT) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit:,} more characters]"


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)  # type: ignore[assignment]
    return d


CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--card:#fff;--bg:#f8fafc;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:28px 24px 48px}
header h1{font-size:24px;margin:0 0 4px}
header .sub{color:var(--muted);margin:0 0 16px;word-break:break-all}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;vertical-align:middle;
background:#e2e8f0;color:#334155}
.badge.Succeeded{background:#dcfce7;color:#166534}.badge.Failed{background:#fee2e2;color:#991b1b}
.badge.Running{background:#dbeafe;color:#1e40af}.badge.Suspended{background:#fef3c7;color:#92400e}
.meta{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:4px 24px;margin:0 0 18px;
font-size:13px}
.meta div{display:flex;gap:8px;min-width:0}.meta dt{color:var(--muted);flex:none;width:110px}
.meta dd{margin:0;overflow-wrap:anywhere}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;margin-bottom:8px}
.kpi{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.kpi .v{font-size:22px;font-weight:650}.kpi .l{color:var(--muted);font-size:12px}
.kpi .d{font-size:12px;color:var(--muted)}.up{color:#15803d!important}.down{color:#b91c1c!important}
nav{margin:18px 0 6px;font-size:13px}nav a{color:var(--accent);text-decoration:none;margin-right:14px}
h2{font-size:18px;margin:30px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
figure h3{font-size:14px;margin:0 0 2px}figure p{margin:0 0 8px;color:var(--muted);font-size:12px}
figure img{display:block;width:100%;height:auto}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line);font-size:12.5px}
th,td{padding:6px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#f1f5f9;font-weight:600;color:#334155;position:sticky;top:0}
td.l,th.l{text-align:left}td.r{font-size:12px;line-height:1.35}tbody tr:nth-child(even){background:#f8fafc}
.scroll{overflow-x:auto;border-radius:10px}
.ex{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;margin-bottom:14px}
.ex h3{font-size:14px;margin:0 0 8px}.ex h3 code{font-weight:400;color:var(--muted)}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.lbl{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);margin:6px 0 2px}
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;background:#f8fafc;border:1px solid var(--line);
border-radius:6px;padding:8px 10px;font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",
monospace;max-height:320px;overflow:auto}
.wrong{color:#b91c1c;font-weight:600}.gold{color:#15803d;font-weight:600}
.gen{border-left:4px solid var(--line);padding:4px 0 4px 12px;margin-top:12px}
.gen.kept{border-color:#16a34a}.gen.rejected{border-color:#dc2626}
.tag{font-size:11px;font-weight:600;padding:1px 7px;border-radius:4px;margin-right:6px}
.tag.kept{background:#dcfce7;color:#166534}.tag.rejected{background:#fee2e2;color:#991b1b}
.note{color:var(--muted);font-size:13px}
footer{margin-top:36px;color:var(--muted);font-size:12px}
@media (max-width:720px){.pair{grid-template-columns:1fr}.grid{grid-template-columns:1fr}}
"""


def _kpi(label: str, value: str, delta: str = "", cls: str = "") -> str:
    d = f'<div class="d {cls}">{_e(delta)}</div>' if delta else ""
    return f'<div class="kpi"><div class="l">{_e(label)}</div><div class="v">{_e(value)}</div>{d}</div>'


def _delta(first: float | None, last: float | None) -> tuple[str, str]:
    if first is None or last is None:
        return "", ""
    pts = (last - first) * 100
    return f"{pts:+.1f} pts vs iteration 0 ({first:.1%})", "up" if pts > 0 else ("down" if pts < 0 else "")


def _header(d: RunData) -> str:
    st = d.status
    its = d.iterations
    phase = st.phase if st else ("Running" if its else "Pending")
    spec = d.spec
    student = _get(spec, "student", "model")
    method = _get(spec, "student", "method")
    teacher = _get(spec, "teacher", "model")
    tkind = _get(spec, "teacher", "kind")
    meta = [
        ("run", d.name), ("uid", d.uid), ("task", _get(spec, "task", "kind")),
        ("student", f"{student} ({method})" if student else None),
        ("teacher", f"{teacher} ({tkind})" if teacher else None),
        ("seed / test rows", f"{_int(d.seed_rows)} / {_int(d.test_rows)}"),
        ("max iterations", _get(spec, "loop", "maxIterations")),
        ("stop reason", st.stop_reason if st else None),
        ("started", st.started_at if st else (its[0].started_at if its else None)),
        ("finished", st.finished_at if st else None),
        ("MLflow", st.mlflow_run_url if st else None),
    ]
    rows = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in meta if v not in (None, ""))
    first, last = (its[0], its[-1]) if its else (None, None)
    seed_d, seed_c = _delta(first.seed_accuracy if first else None, last.seed_accuracy if last else None)
    test_d, test_c = _delta(first.test_accuracy if first else None, last.test_accuracy if last else None)
    tokens = sum(i.tokens.teacher_prompt + i.tokens.teacher_completion for i in its)
    wall = sum(sum(i.seconds.values()) for i in its)
    kpis = "".join([
        _kpi("held-out accuracy (last)", _pct(last.test_accuracy if last else None), test_d, test_c),
        _kpi("seed accuracy (last)", _pct(last.seed_accuracy if last else None), seed_d, seed_c),
        _kpi("iterations committed", str(len(its)), f"of {_get(spec, 'loop', 'maxIterations') or '?'} at most"),
        _kpi("teacher rows kept", _int(sum(i.kept for i in its)),
             f"of {_int(sum(i.generated for i in its))} generated"),
        _kpi("teacher tokens", _int(tokens)),
        _kpi("stage time", _duration(wall), "sum of stage wall times"),
    ])
    return (f'<header><h1>LLM2LLM run {_e(d.name)} <span class="badge {_e(phase)}">{_e(phase)}</span></h1>'
            f'<p class="sub">{_e(d.uri)}</p><dl class="meta">{rows}</dl><div class="kpis">{kpis}</div></header>')


def _figure(anchor: str, title: str, caption: str, uri: str) -> str:
    return (f'<figure id="{anchor}" class="plot"><h3>{_e(title)}</h3><p>{_e(caption)}</p>'
            f'<img src="{uri}" alt="{_e(title)}"></figure>')


def _plots(d: RunData) -> str:
    its = d.iterations
    figs = [
        ("plot-accuracy", "Accuracy per iteration",
         "Student accuracy on the seed set (what the teacher learns from) and on the held-out test set.",
         plot_accuracy(its)),
        ("plot-failures", "Failures per iteration",
         "Seed examples the student got wrong: each becomes a request to the teacher.", plot_failures(its)),
        ("plot-growth", "Dataset growth", "Rows the student trains on in each iteration: seed rows plus kept teacher rows.",
         plot_growth(its, d.seed_rows)),
        ("plot-teacher", "Teacher acceptance and rejections",
         "Teacher candidates per iteration: kept by the filter, or rejected (by reason).", plot_teacher(its)),
        ("plot-durations", "Stage durations", "Wall time of each stage per iteration.", plot_durations(its)),
        ("plot-tokens", "Teacher tokens", "Prompt and completion tokens the teacher used per iteration.",
         plot_tokens(its)),
    ]
    return '<h2 id="plots">Plots</h2><div class="grid">' + "".join(_figure(*f) for f in figs) + "</div>"


def _cell(v: Any) -> str:
    return "<br>".join(_e(x) for x in v) if isinstance(v, list) else _e(v)


def _table(d: RunData) -> str:
    head = [("iter", ""), ("attempt", ""), ("train rows", ""), ("steps", ""), ("loss", ""), ("seed acc", ""),
            ("test acc", ""), ("failures", ""), ("generated", ""), ("kept", ""), ("kept %", ""),
            ("rejected", "l"), ("teacher tokens", ""), ("stage time", ""), ("stop", "l")]
    ths = "".join(f'<th class="{c}">{_e(h)}</th>' for h, c in head)
    body = []
    for it in d.iterations:
        rej = [f"{k.replace('_', ' ')}: {v:,}" for k, v in sorted(it.rejected.items(), key=lambda kv: (-kv[1], kv[0]))]
        cells = [
            (it.index, ""), (it.attempt, ""), (_int(it.train_rows), ""), (_int(it.train_steps), ""),
            ("–" if it.train_loss is None else f"{it.train_loss:.4f}", ""), (_pct(it.seed_accuracy), ""),
            (_pct(it.test_accuracy), ""), (_int(it.failures), ""), (_int(it.generated), ""), (_int(it.kept), ""),
            (_pct(it.kept / it.generated) if it.generated else "–", ""), (rej or ["–"], "l r"),
            (_int(it.tokens.teacher_prompt + it.tokens.teacher_completion), ""),
            (_duration(sum(it.seconds.values())), ""), (it.stop_reason or "", "l"),
        ]
        body.append("<tr>" + "".join(f'<td class="{c}">{_cell(v)}</td>' for v, c in cells) + "</tr>")
    if not body:
        body.append(f'<tr><td class="l" colspan="{len(head)}">no iteration committed yet</td></tr>')
    return (f'<h2 id="figures">Per-iteration figures</h2><div class="scroll"><table id="iterations">'
            f'<thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _pre(text: Any) -> str:
    return f"<pre>{_e(_clip(text))}</pre>"


def _example(ex: Example) -> str:
    f = ex.failure
    parts = [
        f'<div class="ex"><h3>Iteration {ex.iteration}: seed row <code>{_e(f["id"])}</code></h3>',
        '<div class="pair"><div><div class="lbl">seed question</div>', _pre(f["input"]),
        '</div><div><div class="lbl">gold answer</div>', _pre(f["output"]), "</div></div>",
        f'<div class="lbl">student prediction — predicted <span class="wrong">{_e(f.get("predicted_answer") or "none")}'
        f'</span>, gold <span class="gold">{_e(f.get("gold_answer"))}</span></div>', _pre(f["prediction"]),
    ]
    if not ex.kept and not ex.rejected:
        parts.append('<p class="note">No teacher candidates recorded for this failure.</p>')
    for row in ex.kept:
        parts += [f'<div class="gen kept"><span class="tag kept">kept</span><code>{_e(row["id"])}</code> '
                  f'<span class="note">{_e(row.get("teacher_model"))} · prompt {_e(row.get("prompt_hash"))}</span>',
                  '<div class="pair"><div><div class="lbl">generated question</div>', _pre(row["input"]),
                  '</div><div><div class="lbl">generated answer</div>', _pre(row["output"]), "</div></div></div>"]
    for row in ex.rejected[:3]:
        reason = (row.get("reason") or "").replace("_", " ")
        head = (f'<div class="gen rejected"><span class="tag rejected">rejected: {_e(reason)}</span>'
                f'<code>{_e(row["id"])}</code> <span class="note">round {_e(row.get("round"))}</span>')
        if row.get("input") is None:
            parts += [head, '<div class="lbl">raw teacher text</div>', _pre(row.get("raw")), "</div>"]
        else:
            parts += [head, '<div class="pair"><div><div class="lbl">generated question</div>', _pre(row["input"]),
                      '</div><div><div class="lbl">generated answer</div>', _pre(row.get("output")),
                      "</div></div></div>"]
    if len(ex.rejected) > 3:
        parts.append(f'<p class="note">… and {len(ex.rejected) - 3} more rejected candidate(s).</p>')
    parts.append("</div>")
    return "".join(parts)


def _examples_html(d: RunData) -> str:
    body = "".join(_example(ex) for ex in d.examples) or '<p class="note">No failures recorded.</p>'
    return ('<h2 id="examples">Example failures and what the teacher made of them</h2>'
            '<p class="note">Seed examples the student got wrong, its prediction, and the teacher rows generated '
            'from them (joined by <code>parent_id</code>). Teacher text is shown verbatim, escaped.</p>' + body)


def render_html(d: RunData) -> str:
    generated = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    nav = ('<nav><a href="#plots">Plots</a><a href="#figures">Per-iteration figures</a>'
           '<a href="#examples">Examples</a></nav>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>LLM2LLM report: {_e(d.name)}</title><style>{CSS}</style></head><body><main>"
        + _header(d) + nav + _plots(d) + _table(d) + _examples_html(d)
        + f"<footer>Generated by llm2llm report at {_e(generated)} from {_e(d.uri)}.</footer>"
        + "</main></body></html>\n"
    )


def build_report(store: RunStorage, examples_per_iteration: int = 3) -> str:
    """The report of one run folder, as an HTML string."""
    _matplotlib()
    return render_html(collect(store, examples_per_iteration))


def report_uri(run_dir: str, examples_per_iteration: int = 3) -> str:
    store = open_run(run_dir)
    from .lineage import is_run

    if not is_run(store):
        raise ReportError(f"{run_dir}: not a run folder (no run.json, status.json or iter-0)")
    return build_report(store, examples_per_iteration)


