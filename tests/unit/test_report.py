"""`llm2llm report`: a self-contained HTML report of a run folder, checked as text and in a real browser."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llm2llm.cli import main
from llm2llm.report import build_report, collect, report_uri
from llm2llm.storage import RunStorage
from tests.conftest import REPO
from tests.unit.test_lineage import SEED, kept_rows, make_run

PLOTS = ("plot-accuracy", "plot-failures", "plot-growth", "plot-teacher", "plot-durations", "plot-tokens")
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">')


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunStorage:
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(run: RunStorage) -> str:
    return build_report(run)


def _png(b64: str):
    from PIL import Image

    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.verify()
    return Image.open(io.BytesIO(raw)).convert("RGB")


def test_every_plot_is_an_embedded_valid_png(page: str):
    for anchor in PLOTS:
        assert f'<figure id="{anchor}" class="plot">' in page, anchor
    imgs = IMG.findall(page)
    assert [alt for _, alt in imgs] == ["Accuracy per iteration", "Failures per iteration", "Dataset growth",
                                         "Teacher acceptance and rejections", "Stage durations", "Teacher tokens"]
    for b64, alt in imgs:
        img = _png(b64)
        assert img.width >= 600 and img.height >= 300, alt
        colors = img.getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 20, f"{alt}: looks blank"


def test_self_contained_and_untrusted_text_escaped(page: str):
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # no script at all, in particular not the teacher's
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page and "<b>bold</b>" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r'(?:src|href)="(?!data:|#)', page), "external asset or link"
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_figures_table_and_header(page: str, run: RunStorage):
    table = page[page.index('<table id="iterations">'):page.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    assert len(rows) == 3
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    # iter, attempt, train rows, steps, loss, seed acc, test acc, failures, generated, kept, kept %, rejected, ...
    assert [c[0] for c in cells] == ["0", "1", "2"]
    assert [c[2] for c in cells] == ["6", "14", "18"]
    assert [c[5] for c in cells] == ["33.3%", "66.7%", "83.3%"]
    assert [c[6] for c in cells] == ["25.0%", "50.0%", "75.0%"]
    assert [c[7] for c in cells] == ["4", "2", "1"]
    assert [c[8] for c in cells] == ["16", "8", "0"] and [c[9] for c in cells] == ["8", "4", "0"]
    assert cells[0][11] == "duplicate: 4<br>unparseable: 4" and cells[2][14] == "MaxIterations"
    assert cells[0][12] == "2,952"  # teacher tokens: 4 x (310+k + 120+k + 290 + 15)
    assert "LLM2LLM run gsm8k-demo" in page and '<span class="badge Succeeded">' in page
    assert "+50.0 pts vs iteration 0 (25.0%)" in page  # held-out accuracy gain


def test_examples_join_failures_with_their_generated_rows(page: str, run: RunStorage):
    examples = page[page.index('id="examples"'):]
    blocks = examples.split('<div class="ex">')[1:]
    assert len(blocks) == 3 + 2 + 1  # at most 3 per iteration: 4, 2 and 1 failures
    first = blocks[0]
    assert "Iteration 0: seed row" in first and html.escape(SEED[0][0]) in first
    assert 'predicted <span class="wrong">79</span>, gold <span class="gold">72</span>' in first
    for row in kept_rows(run, 0)[:2]:  # both rows the teacher made from seed row 0 and the filter kept
        assert row["parent_id"] in first and row["id"] in first and html.escape(row["input"]) in first
    assert "rejected: duplicate" in first and "rejected: unparseable" in first
    assert "I cannot do that &lt;script&gt;" in first
    assert "No teacher candidates recorded" in blocks[-1]  # the last iteration's failure


def test_cli_default_output_and_errors(run: RunStorage, tmp_path: Path, capsys):
    assert main(["report", run.uri()]) == 0
    assert Path(run.root, "report.html").read_text().startswith("<!DOCTYPE html>")
    out = tmp_path / "r.html"
    assert main(["report", f"file://{run.root}", "-o", str(out), "--examples", "1"]) == 0
    assert out.read_text().count('<div class="ex">') == 3  # one per iteration
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_run_without_iterations_still_renders(tmp_path: Path):
    store = RunStorage(str(tmp_path), "fresh")
    store.write_json(store.path("run.json"), {"name": "fresh", "uid": "u", "spec": {}})
    page = build_report(store)
    assert page.count('class="plot"') == len(PLOTS) and len(IMG.findall(page)) == len(PLOTS)
    assert "no iteration committed yet" in page and "No failures recorded." in page
    assert collect(store).iterations == []


@pytest.mark.skipif(not (REPO / "runs" / "reviews" / "status.json").exists(), reason="no runs/reviews from `make demo`")
def test_real_demo_run_renders():
    page = report_uri(str(REPO / "runs" / "reviews"))
    assert len(IMG.findall(page)) == len(PLOTS) and "<script" not in page.lower()


# --- in a real browser ------------------------------------------------------------------------------
CHECK = """<script>
window.addEventListener('load', () => {
  const out = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {id: i.closest('figure').id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
            x: r.left + scrollX, y: r.top + scrollY, rw: r.width, rh: r.height};
  });
  const pre = document.createElement('pre');
  pre.id = 'img-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        script = REPO / "scripts" / "install-chromium.sh"
        res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        exe = shutil.which("chromium")
        if exe is None:
            pytest.skip(f"chromium is not installed and scripts/install-chromium.sh could not install it: "
                        f"{(res.stdout + res.stderr)[-500:]}")
    return exe


def _browser(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp)


def test_plots_render_in_a_headless_browser(page: str, tmp_path: Path):
    from PIL import Image

    exe = _chromium()
    # The page itself forbids scripts (CSP): a copy without that meta tag runs the measuring script.
    csp = re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', page).group(0)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace(csp, "").replace("</body>", CHECK + "</body>"))
    blocked = tmp_path / "blocked.html"
    blocked.write_text(page.replace("</body>", CHECK + "</body>"))
    original = tmp_path / "report.html"
    original.write_text(page)

    dom = _browser(exe, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="img-check">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"measuring script did not run: {dom.stderr[-1500:]}"
    imgs = json.loads(html.unescape(m.group(1)))
    assert [i["id"] for i in imgs] == list(PLOTS)
    for i in imgs:
        assert i["complete"] and i["w"] > 500 and i["h"] > 250 and i["rw"] > 300, i

    # The CSP really blocks script: the same probe inside the untouched page never runs.
    dom = _browser(exe, tmp_path, "--virtual-time-budget=5000", "--dump-dom", blocked.as_uri())
    assert "<main>" in dom.stdout and 'id="img-check"' not in dom.stdout

    shot = tmp_path / "shot.png"
    res = _browser(exe, tmp_path, f"--screenshot={shot}", original.as_uri())
    assert shot.exists(), res.stderr[-1500:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    for i in imgs:  # each plot area on screen holds a drawn chart, not a blank box
        if i["y"] + i["rh"] > img.height:
            continue
        box = img.crop((int(i["x"]), int(i["y"]), int(i["x"] + i["rw"]), int(i["y"] + i["rh"])))
        colors = box.getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 20, i["id"]
        saturated = sum(n for n, (r, g, b) in (colors or []) if max(r, g, b) - min(r, g, b) > 60)
        assert colors is None or saturated > 500, f"{i['id']}: no coloured marks on screen"
