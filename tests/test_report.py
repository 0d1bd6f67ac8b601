"""``alignflow report``: summaries per kind, the self-contained HTML page, and the page rendered in
a real headless Chromium (screenshot, nothing fetched from the network)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from alignflow.feedback.labels import convert_labels_file
from alignflow.flows.cli import app
from alignflow.flows.report import build_report, external_references
from alignflow.schemas.kinds import KINDS
from alignflow.schemas.store import QUARANTINE_KIND, write_dataset
from alignflow.schemas.summary import listwise_ties, prompt_lengths, summarize
from alignflow.schemas.validate import QUARANTINE_SCHEMA, validate

P = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: abc"}]
def U(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


EVIL = "<script>alert(1)</script><img src=http://example.invalid/x.png>"  # text, never markup
ROWS = {
    "prompts": [{"prompt": P}, {"prompt": U("Spell 7")}, {"prompt": U(EVIL)}],
    "samples": [{"prompt_id": "a", "prompt": P, "response": "cba", "model": "m1", "logp": -3.5, "n_tokens": 3},
                {"prompt_id": "a", "prompt": P, "response": "bca", "model": "m2", "logp": -5.0, "n_tokens": 3},
                {"prompt_id": "b", "prompt": U("Spell 7"), "response": EVIL, "model": "m1", "logp": -9.0, "n_tokens": 9}],
    "pairwise": [{"prompt": P, "chosen": "cba", "rejected": "abc!", "margin": 2.0, "source": "human",
                  "judge_prob": 0.9, "judge_consistent": True, "agreement": 1.0},
                 {"prompt": U("Spell 7"), "chosen": "seven", "rejected": EVIL, "margin": 0.5, "source": "ai",
                  "judge_prob": 0.3, "judge_consistent": False, "agreement": 0.5},
                 {"prompt": U("Spell 8"), "chosen": "eight, surely", "rejected": "8", "margin": None, "source": "ai",
                  "judge_prob": 0.5, "judge_consistent": True, "agreement": 1.0}],
    "listwise": [{"prompt": P, "responses": ["cba", "cab", "abc"], "scores": [2.0, 1.0, 1.0]},
                 {"prompt": U("Spell 7"), "responses": ["seven", EVIL], "scores": [3.0, 3.0]},
                 {"prompt": U("Spell 8"), "responses": ["eight", "8", "ate"], "scores": [3.0, 2.0, 1.0]}],
    "binary": [{"prompt": P, "response": "cba", "label": True}, {"prompt": P, "response": EVIL, "label": False},
               {"prompt": U("Spell 7"), "response": "seven", "label": True}],
    "sft": [{"prompt": P, "response": "cba"}, {"prompt": U("Spell 7"), "response": EVIL}],
    "critiques": [{"prompt": P, "response": "cba", "rounds": [
        {"principle": "be correct", "critique": "the order is wrong", "revision": "cba"},
        {"principle": "be brief", "critique": EVIL, "revision": "cba"}]}],
}
# what each kind's page must show besides the common sections
EXPECTED = {
    "prompts": ["Prompt length", "Prompt turns per role"],
    "samples": ["Rows per model", "Log-probability", "Responses per prompt"],
    "pairwise": ["Response length: chosen vs rejected", "Length gap", "Rows per source", "Judge P(chosen better)",
                 "Position-consistent verdicts (same winner in both orders): <b>2 of 3 (66.7%)",
                 "Judge agrees with the stored preference (P(chosen better) &gt; 0.5): <b>1 of 3 (33.3%)",
                 "chosen is longer than rejected in <b>1 of 3 pairs", "Mean annotator agreement: <b>0.833"],
    "listwise": ["Responses per row", "Score spread per row", "rows with a tie</td><td class=\"n\">2</td><td class=\"n\">66.7%",
                 "tied pairs among all pairs</td><td class=\"n\">2</td><td class=\"n\">28.6%", "rank 1"],
    "binary": ["Response length: desirable vs undesirable", "Labels", "undesirable"],
    "sft": ["Response length"],
    "critiques": ["Critique-revision rounds", "round 2: be brief", "the order is wrong"],
}


def _dataset(path: Path, kind: str, provenance: dict | None = None) -> Path:
    table = validate(pa.Table.from_pylist(ROWS[kind]), kind)
    assert table.quarantined.num_rows == 0, table.quarantined.to_pylist()
    return write_dataset(path, table.valid, kind, provenance or {"flow": "test"}, rows_per_shard=2)


def test_summaries_are_column_operations_with_exact_counts():
    assert listwise_ties(pa.array([[1.0, 1.0, 2.0], [3.0, 3.0], [5.0], [], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])) == {
        "rows_with_pairs": 4, "tie_rows": 3, "all_tie_rows": 2, "tie_pairs": 5, "pairs": 10}
    chars, turns = prompt_lengths(pa.array([P, [], [{"role": "user", "content": "héllo"}]],
                                           pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
    assert chars.tolist() == [21, 0, 5] and turns.tolist() == [2, 0, 1]
    table = validate(pa.Table.from_pylist(ROWS["pairwise"]), "pairwise").valid
    s = summarize("pairwise", table.to_batches(max_chunksize=2))
    assert s.rows == 3 and s.values("margin").tolist() == [2.0, 0.5]  # a null margin is not a number
    assert s.values("length_gap").tolist() == [-1, 5 - len(EVIL), 12]
    assert s.counts["source"] == {"human": 1, "ai": 2} and s.counts["judge_consistent"] == {True: 2, False: 1}


@pytest.mark.parametrize("kind", [*KINDS, QUARANTINE_KIND])
def test_report_of_every_kind_is_one_self_contained_page(tmp_path, kind):
    if kind == QUARANTINE_KIND:
        rows = pa.table({"row": [3, 9], "reason": ["chosen == rejected", EVIL], "record": ['{"a": 1}', "{}"]})
        data = write_dataset(tmp_path / "q", rows.cast(QUARANTINE_SCHEMA), kind, {"flow": "test"})
    else:
        data = _dataset(tmp_path / kind, kind)
    result = build_report(data)
    page = result.path.read_text()
    assert result.path == tmp_path / f"{data.name}.report.html" and result.kind == kind
    assert external_references(page) == []
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page  # data shown as text, escaped
    assert f"{data.name} · {kind} ·" in page and "Columns and provenance" in page
    for needle in EXPECTED.get(kind, ["Quarantine reasons", "chosen == rejected"]):
        assert needle in page, needle
    assert page.count('class="plot"') >= (1 if kind == QUARANTINE_KIND else 2)
    svg = base64.b64decode(page.split('src="data:image/svg+xml;base64,')[1].split('"')[0]).decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "</svg>" in svg


def test_report_samples_shards_of_a_big_dataset_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"p{i}", "chosen": "x" * int(rng.integers(1, 50)), "rejected": "y", "margin": 1.0,
             "source": "human"} for i in range(200)]
    data = write_dataset(tmp_path / "big", validate(pa.Table.from_pylist(rows), "pairwise").valid, "pairwise",
                         rows_per_shard=20)
    result = build_report(data, tmp_path / "r.html", max_rows=50)
    page = (tmp_path / "r.html").read_text()
    assert result.sampled.rows == 50 and result.sampled.total == 200 and result.sampled.shards == 3
    assert "Statistics are computed on 50 of 200 rows: 3 of 10 shards chosen at random (seed 0)" in page
    assert "<td class=\"n\">50</td>" in page  # the statistics table counts the sampled rows
    whole = build_report(data, tmp_path / "all.html")
    assert whole.sampled.rows == 200 and not whole.sampled.note


def test_report_shows_accounting_and_the_quarantine_written_beside(tmp_path):
    src = tmp_path / "hh.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}]) + "\n")
    convert_labels_file(src, tmp_path / "pairs", "hh-rlhf", "pairwise", quarantine_path=tmp_path / "pairs-bad")
    result = build_report(tmp_path / "pairs")
    page = result.path.read_text()
    assert result.quarantine == tmp_path / "pairs-bad"
    assert "read <b>3</b> = written <b>2</b> + quarantined <b>1</b> + dropped-by-rule <b>0</b> records" in page
    assert "(adds up)" in page and "1 quarantined rows in" in page
    assert "row 1 · transcripts diverge before the last assistant turn" in page
    # found by what wrote it, not by its name; another conversion's quarantine is not this one's
    (tmp_path / "pairs-bad").rename(tmp_path / "any-name")
    assert build_report(tmp_path / "pairs").quarantine == tmp_path / "any-name"
    shutil.rmtree(tmp_path / "any-name")
    convert_labels_file(src, tmp_path / "other", "hh-rlhf", "binary", quarantine_path=tmp_path / "other-bad")
    assert build_report(tmp_path / "pairs").quarantine is None


def test_external_reference_check_finds_what_would_load():
    svg_out = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"><image href="http://x/y.png"/></svg>').decode()
    svg_ok = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"><use href="#a"/></svg>').decode()
    for bad in ['<img src="http://example.invalid/a.png">', '<link rel="stylesheet" href="s.css">', "<script></script>",
                '<div style="background:url(https://x/y)">', "<style>@import 'a.css';</style>",
                '<a href="//example.invalid/">x</a>', f'<img src="data:image/svg+xml;base64,{svg_out}">']:
        assert external_references(f"<html><body>{bad}</body></html>"), bad
    good = (f'<html><head><style>p{{color:red}}</style></head><body><img src="data:image/svg+xml;base64,{svg_ok}">'
            '<a href="#top">top</a><p>src=http://example.invalid is text</p></body></html>')
    assert external_references(good) == []


def test_report_command(tmp_path):
    data = _dataset(tmp_path / "d", "listwise")
    runner = CliRunner()
    out = runner.invoke(app, ["report", str(data), "-o", str(tmp_path / "page.html"), "--examples", "1"])
    assert out.exit_code == 0, out.output
    assert f"wrote {tmp_path / 'page.html'} (listwise, 3 rows)" in out.output
    assert (tmp_path / "page.html").read_text().count('class="example"') == 1
    out = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "no such dataset folder" in out.output and "Traceback" not in out.output
    out = runner.invoke(app, ["report", str(data), "--quarantine", str(data)])
    assert out.exit_code == 2 and "not a quarantine dataset" in out.output


# -- a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
HISTOGRAM_GREEN = np.array([47, 111, 79])  # COLORS[0] of flows/report.py, drawn only inside the plots


def chromium_screenshot(page: Path, png: Path, height: int = 4000) -> list[str]:
    """Render ``page`` in headless Chromium to ``png``; returns the URLs of every network request
    the page made (from Chromium's net log: requests whose isolation key is the page's file:// site;
    Chromium's own background requests carry another key)."""
    netlog = png.with_suffix(".netlog.json")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size=1300,{height}",
                        f"--screenshot={png}", f"--log-net-log={netlog}", page.resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"] if e["type"] == start
            and "file://" in e["params"].get("network_isolation_key", "") + e["params"].get("site_for_cookies", "")]


def _plot_pixels(png: Path) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - HISTOGRAM_GREEN).sum(axis=2) < 40).sum())


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt-get)")


@needs_chromium
def test_report_renders_in_chromium_and_fetches_nothing(tmp_path):
    rows = [{**r, "prompt": U(f"{r['prompt'][-1]['content']} #{i}")} for i in range(40) for r in ROWS["pairwise"]]
    data = write_dataset(tmp_path / "pairs", validate(pa.Table.from_pylist(rows), "pairwise").valid, "pairwise")
    page = build_report(data).path
    png = tmp_path / "pairs.png"
    assert chromium_screenshot(page, png) == []
    assert png.stat().st_size > 30_000 and _plot_pixels(png) > 2_000  # the embedded SVG plots were drawn
    # the same check sees a page that loads something, and no plot on it
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/x.png"><p>hi</p></body></html>')
    assert chromium_screenshot(bad, tmp_path / "bad.png", height=300) == ["http://example.invalid/x.png"]
    assert _plot_pixels(tmp_path / "bad.png") == 0


@needs_chromium
def test_reports_of_the_real_label_files_render_in_chromium(human_labels, tmp_path):
    jobs = {"hh": ("hh-rlhf_harmless-base_test.jsonl.gz", "hh-rlhf", "pairwise"),
            "oasst": ("oasst1_en_validation.jsonl", "oasst", "listwise"),
            "alpaca": ("alpaca_eval_gpt4_annotations_alpaca-7b.json", "alpaca-eval", "pairwise"),
            "tulu": ("tulu1_human_eval_annotations.xlsx", "graded-pairwise", "pairwise")}
    shots = Path(os.environ.get("ALIGNFLOW_REPORT_SHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for name, (file, fmt, kind) in jobs.items():
        convert_labels_file(human_labels / file, tmp_path / name, fmt, kind, quarantine_path=tmp_path / f"{name}-quarantine")
        result = build_report(tmp_path / name, shots / f"{name}.html")
        assert external_references(result.path.read_text()) == []
        png = shots / f"{name}.png"
        assert chromium_screenshot(result.path, png) == [], name
        assert png.stat().st_size > 50_000 and _plot_pixels(png) > 2_000, name
