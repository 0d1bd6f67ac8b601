"""``alignflow report``: one self-contained HTML page that shows a dataset of any kind.

What the page holds: the manifest (kind, rows, shards, provenance) and the conversion's
accounting (read = written + quarantined + dropped-by-rule, with reasons), the quarantined rows
(from a quarantine dataset beside this one, or one given), length distributions of prompts and
responses (chosen against rejected, desirable against undesirable), score, margin and judge
histograms, tie rates, per-source and per-model counts, judge position-consistency and
agreement, and a few rows rendered as chat.

The page fetches nothing: plots are SVG embedded as ``data:`` URIs, styles are inline, there is
no script. Statistics come from one pass over the data with column operations
(``schemas.summary``); a dataset of more than ``max_rows`` rows is summarised on shards chosen
at random, and the page says so.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.schemas.store import QUARANTINE_KIND, DatasetError, read_manifest, shard_paths, verify_dataset
from alignflow.schemas.summary import SERIES, Summary, summarize

MAX_ROWS = 1_000_000  # rows summarised before shards are sampled
EXAMPLES = 3
TEXT_LIMIT = 1_500  # characters of one message shown in the examples
BATCH_ROWS = 65_536

# series drawn together in one plot: (title, [series names])
PLOTS = [
    ("Prompt length", ["prompt_chars"]),
    ("Prompt turns", ["prompt_turns"]),
    ("Response length: chosen vs rejected", ["chosen_chars", "rejected_chars"]),
    ("Length gap: chosen minus rejected", ["length_gap"]),
    ("Response length: desirable vs undesirable", ["desirable_chars", "undesirable_chars"]),
    ("Response length", ["response_chars"]),
    ("Responses per row", ["responses_per_row"]),
    ("Responses per prompt", ["responses_per_prompt"]),
    ("Scores", ["score"]),
    ("Score spread per row", ["score_spread"]),
    ("Margin (strength of preference)", ["margin"]),
    ("Log-probability", ["logp"]),
    ("Response tokens", ["n_tokens"]),
    ("Judge P(chosen better)", ["judge_prob"]),
    ("Annotator agreement", ["agreement"]),
    ("Annotators per item", ["annotators"]),
    ("Critique-revision rounds", ["rounds"]),
    ("Critique length", ["critique_chars"]),
]
COLORS = ["#2f6f4f", "#b5443b", "#3b6ea5", "#c98a1a"]


@dataclass
class Sampled:
    """Which rows the statistics come from."""

    rows: int
    total: int
    shards: int
    total_shards: int
    note: str = ""


@dataclass
class Report:
    path: Path
    dataset: Path
    kind: str
    rows: int
    sampled: Sampled
    quarantine: Path | None = None
    sections: list[str] = field(default_factory=list)


# -- reading ----------------------------------------------------------------------------------


def _sample_shards(files: list[Path], max_rows: int, seed: int) -> tuple[list[Path], Sampled]:
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    total = sum(rows)
    if total <= max_rows:
        return files, Sampled(total, total, len(files), len(files))
    order = np.random.default_rng(seed).permutation(len(files))
    chosen, taken = [], 0
    for i in order:
        chosen.append(int(i))
        taken += rows[i]
        if taken >= max_rows:
            break
    chosen.sort()
    taken = min(taken, max_rows)
    note = (f"Statistics are computed on {taken:,} of {total:,} rows: {len(chosen)} of {len(files)} shards chosen "
            f"at random (seed {seed})" + (", read up to that many rows." if taken == max_rows else "."))
    return [files[i] for i in chosen], Sampled(taken, total, len(chosen), len(files), note)


def _batches(files: list[Path], limit: int) -> Iterator[pa.RecordBatch]:
    left = limit
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
            if left <= 0:
                return
            if batch.num_rows > left:
                batch = batch.slice(0, left)
            left -= batch.num_rows
            yield batch


def _examples_and_summary(kind: str, files: list[Path], limit: int, n_examples: int,
                          seed: int) -> tuple[Summary, list[dict]]:
    examples: list[dict] = []
    rng = np.random.default_rng(seed)

    def keep_examples(batches):
        for batch in batches:
            wanted = min(n_examples - len(examples), batch.num_rows)
            if wanted > 0:  # rows at random from the first batches read
                idx = np.sort(rng.choice(batch.num_rows, size=wanted, replace=False))
                examples.extend(pa.Table.from_batches([batch]).take(pa.array(idx)).to_pylist())
            yield batch

    return summarize(kind, keep_examples(_batches(files, limit))), examples


def find_quarantine(dataset: Path, manifest: dict) -> Path | None:
    """A quarantine dataset beside ``dataset`` written by the same conversion (same source file
    and checksum) or by validating it (``parent_datasets``)."""
    prov = manifest.get("provenance", {})
    for sibling in sorted(dataset.parent.iterdir()) if dataset.parent.is_dir() else []:
        if sibling == dataset or not sibling.is_dir():
            continue
        try:
            other = read_manifest(sibling)
        except DatasetError:  # not a dataset folder
            continue
        if other["kind"] != QUARANTINE_KIND:
            continue
        q = other.get("provenance", {})
        same_conversion = prov.get("source_sha256") and q.get("source_sha256") == prov.get("source_sha256") \
            and q.get("source_file") == prov.get("source_file") and q.get("target_format") == prov.get("target_format")
        validated = str(dataset) in [str(p) for p in q.get("parent_datasets", [])] or \
            dataset.resolve() in [Path(p).resolve() for p in q.get("parent_datasets", [])]
        if same_conversion or validated:
            return sibling
    return None


# -- plots ------------------------------------------------------------------------------------


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _img(svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode()).decode()
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{data}">'


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 2.7), dpi=96)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.89, bottom=0.19)  # fixed: a layout engine doubles the cost
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def histogram(series: dict[str, np.ndarray], title: str, xlabel: str) -> str:
    """Overlaid histograms on shared bins (counted in NumPy; matplotlib draws only the bins);
    values past the 99.5th percentile go to the last bin."""
    both = np.concatenate(list(series.values()))
    lo, hi = float(both.min()), float(np.percentile(both, 99.5))
    if hi <= lo:
        hi = lo + 1
    if hi - lo <= 60 and np.array_equal(both[:10_000], np.round(both[:10_000])):  # whole numbers: a bin each
        edges = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5)
    else:
        edges = np.linspace(lo, hi, 41)
    fig, ax = _figure()
    for i, (label, values) in enumerate(series.items()):
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        ax.stairs(counts, edges, fill=len(series) == 1, color=COLORS[i % len(COLORS)], linewidth=1.6,
                  label=f"{label} (median {_num(float(np.median(values)))})")
    over = int((both > edges[-1]).sum())
    if len(series) == 1:
        title += f" · median {_num(float(np.median(both)))}"
    else:
        ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel + (f"; {over:,} values past {edges[-1]:,.4g} in the last bin" if over else ""), fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.tick_params(labelsize=8)
    return _img(_svg(fig), title)


def bar_chart(counts: dict, title: str, limit: int = 15) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = items[:limit]
    if len(items) > limit:
        shown.append((f"({len(items) - limit} more)", sum(v for _, v in items[limit:])))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 0.6 + 0.24 * len(shown)), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    labels = [_short(str(k), 48) for k, _ in shown][::-1]
    values = [v for _, v in shown][::-1]
    ax.barh(labels, values, color=COLORS[2])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,}", va="center", fontsize=7)
    ax.set_title(title, fontsize=10, loc="left")
    ax.tick_params(labelsize=7)
    return _img(_svg(fig), title)


# -- html -------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f6f3;color:#222}
header{background:#1f3b2d;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}main{padding:12px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px 18px;margin:14px 0}
h2{font-size:17px;margin:0 0 10px}h3{font-size:14px;margin:12px 0 6px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.plot{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eee;padding:3px 10px;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.note{background:#fff7dd;border:1px solid #ecd48a;
padding:8px 12px;border-radius:6px;font-size:13px}.big{font-size:15px}.ok{color:#2f6f4f}.bad{color:#b5443b}
.example{border-top:1px solid #ddd;padding-top:10px;margin-top:10px}.meta{font-size:12px;color:#666}
.chat{display:flex;flex-direction:column;gap:6px;max-width:900px}.msg{border-radius:10px;padding:8px 12px;
white-space:pre-wrap;font-size:13px;line-height:1.35;overflow-wrap:anywhere}.role{font-size:11px;font-weight:600;
text-transform:uppercase;letter-spacing:.04em;opacity:.7;display:block;margin-bottom:2px}
.user{background:#e8eef7;align-self:flex-start;max-width:85%}.system{background:#eee;font-style:italic}
.assistant{background:#f1f1ec;align-self:flex-end;max-width:85%}.tool{background:#f3ecf7}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px;max-width:1200px}.chosen{background:#e3f1e6;
border:1px solid #9cc9a8}.rejected{background:#f8e4e1;border:1px solid #dda39b}.badge{display:inline-block;
border-radius:9px;padding:0 8px;font-size:11px;background:#ddd;margin-left:6px}pre{white-space:pre-wrap;
font-size:12px;background:#f4f4f4;padding:8px;border-radius:6px;overflow-wrap:anywhere}
details summary{cursor:pointer;font-size:13px}
"""


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(value, limit: int = TEXT_LIMIT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    more = len(text) - limit
    shown = html.escape(text[:limit]) if more > 0 else html.escape(text)
    return shown + (f'<span class="meta"> … ({more:,} more characters)</span>' if more > 0 else "")


def _table(rows: list[tuple], head: tuple | None = None, numeric: set[int] = frozenset()) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f'<th class="{"n" if i in numeric else ""}">{html.escape(str(h))}</th>'
                                    for i, h in enumerate(head)) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{"n" if i in numeric else ""}">{c}</td>' for i, c in enumerate(row))
                   + "</tr>")
    return "".join(out) + "</table>"


def _num(x) -> str:
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x + 0.0:,.4g}"  # + 0.0: no "-0"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def _message(role: str, content) -> str:
    role = str(role or "?")
    cls = role if role in ("user", "assistant", "system", "tool") else "user"
    return f'<div class="msg {cls}"><span class="role">{html.escape(role)}</span>{_text(content)}</div>'


def _prompt(row: dict) -> str:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return "".join(_message(m.get("role"), m.get("content")) for m in prompt if isinstance(m, dict))
    return _message("user", prompt) if prompt is not None else ""


def render_example(kind: str, row: dict, number: int) -> str:
    meta = [f"prompt_id {html.escape(str(row.get('prompt_id', '')))}"]
    body = ""
    if kind == "pairwise":
        for key in ("margin", "source", "judge_prob", "judge_consistent", "agreement"):
            if row.get(key) is not None:
                meta.append(f"{key} {html.escape(str(row[key]))}")
        body = (f'<div class="pair"><div class="msg chosen"><span class="role">chosen</span>{_text(row.get("chosen"))}'
                f'</div><div class="msg rejected"><span class="role">rejected</span>{_text(row.get("rejected"))}</div></div>')
    elif kind == "listwise":
        pairs = sorted(zip(row.get("scores") or [], row.get("responses") or []), key=lambda p: -(p[0] if p[0] is not None else -1e300))
        body = "".join(f'<div class="msg assistant"><span class="role">rank {i + 1}<span class="badge">score {_num(s) if s is not None else "-"}</span></span>{_text(r)}</div>'
                       for i, (s, r) in enumerate(pairs))
    elif kind == "binary":
        label = row.get("label")
        body = (f'<div class="msg {"chosen" if label else "rejected"}"><span class="role">response'
                f'<span class="badge">{"desirable" if label else "undesirable"}</span></span>{_text(row.get("response"))}</div>')
    elif kind in ("samples", "sft", "critiques"):
        for key in ("model", "logp", "n_tokens"):
            if row.get(key) is not None:
                meta.append(f"{key} {html.escape(str(row[key]))}")
        body = _message("assistant", row.get("response"))
        for i, rnd in enumerate(row.get("rounds") or []):
            body += (f'<details><summary>round {i + 1}: {html.escape(_short(str(rnd.get("principle") or ""), 100))}</summary>'
                     f'<div class="msg system"><span class="role">critique</span>{_text(rnd.get("critique"))}</div>'
                     f'<div class="msg assistant"><span class="role">revision</span>{_text(rnd.get("revision"))}</div></details>')
    elif kind == QUARANTINE_KIND:
        meta = [f"row {row.get('row')}", html.escape(str(row.get("reason")))]
        return (f'<div class="example"><div class="meta">{" · ".join(meta)}</div><pre>{_text(row.get("record"), 3000)}'
                f'</pre></div>')
    return (f'<div class="example"><h3>Example {number}</h3><div class="meta">{" · ".join(meta)}</div>'
            f'<div class="chat">{_prompt(row)}{body}</div></div>')


def _stats_table(summary: Summary) -> str:
    rows = []
    for name in summary.names():
        v = summary.values(name)
        rows.append((html.escape(SERIES[name]), _num(len(v)), _num(float(v.mean())), _num(float(np.median(v))),
                     _num(float(np.percentile(v, 5))), _num(float(np.percentile(v, 95))), _num(float(v.min())),
                     _num(float(v.max()))))
    return _table(rows, ("measure", "rows", "mean", "median", "p5", "p95", "min", "max"), numeric={1, 2, 3, 4, 5, 6, 7})


def _accounting(manifest: dict) -> str:
    prov = manifest.get("provenance", {})
    acc = prov.get("accounting")
    parts = []
    if acc:
        read, written, quarantined, dropped = acc.get("read", 0), acc.get("written", 0), acc.get("quarantined", 0), \
            acc.get("dropped_by_rule", 0)
        adds = read == written + quarantined + dropped
        parts.append(f'<p class="big">read <b>{read:,}</b> = written <b>{written:,}</b> + quarantined <b>{quarantined:,}</b>'
                     f' + dropped-by-rule <b>{dropped:,}</b> records <span class="{"ok" if adds else "bad"}">'
                     f'({"adds up" if adds else "does NOT add up"})</span>; {acc.get("rows_out", manifest["num_rows"]):,} '
                     f'{html.escape(str(manifest["kind"]))} rows out</p>')
        reasons = [(f"quarantined: {html.escape(r)}", _num(n)) for r, n in acc.get("quarantine_reasons", {}).items()]
        reasons += [(f"dropped by rule: {html.escape(r)}", _num(n)) for r, n in acc.get("dropped_reasons", {}).items()]
        for key, label in (("tie_pairs_left_out", "tie pairs left out (a pair cannot hold a tie)"),
                           ("identical_pairs_left_out", "pairs of identical texts left out")):
            if acc.get(key):
                reasons.append((label, _num(acc[key])))
        if reasons:
            parts.append(_table(reasons, ("reason", "records"), numeric={1}))
    else:
        parts.append(f'<p>No conversion accounting in the manifest (written by {html.escape(str(prov.get("flow", "?")))}).'
                     f' {manifest["num_rows"]:,} rows.</p>')
    if prov.get("agreement"):
        parts.append(f"<h3>Annotator agreement</h3><pre>{_text(prov['agreement'], 2000)}</pre>")
    return "".join(parts)


def _ties(summary: Summary, manifest: dict) -> str:
    t, rows = summary.ties, []
    if summary.kind == "listwise" and t.get("rows_with_pairs"):
        rows += [("rows with a tie", _num(t["tie_rows"]), _pct(t["tie_rows"], t["rows_with_pairs"])),
                 ("rows where every response ties", _num(t["all_tie_rows"]), _pct(t["all_tie_rows"], t["rows_with_pairs"])),
                 ("tied pairs among all pairs", _num(t["tie_pairs"]), _pct(t["tie_pairs"], t["pairs"]))]
    if summary.kind == "pairwise":
        rows += [("rows with margin 0", _num(t.get("margin_zero", 0)), _pct(t.get("margin_zero", 0), summary.rows)),
                 ("rows with chosen == rejected", _num(t.get("same_text", 0)), _pct(t.get("same_text", 0), summary.rows))]
        acc = manifest.get("provenance", {}).get("accounting") or {}
        tie_records = sum(n for r, n in acc.get("dropped_reasons", {}).items() if "tie" in r)
        if acc:
            rows.append(("records dropped as ties by the conversion", _num(tie_records), _pct(tie_records, acc.get("read", 0))))
            if acc.get("tie_pairs_left_out"):
                rows.append(("tie pairs left out by the conversion", _num(acc["tie_pairs_left_out"]), "-"))
    if not rows:
        return ""
    return _table(rows, ("", "count", "rate"), numeric={1, 2})


def _judge(summary: Summary) -> str:
    parts = []
    consistent = summary.counts.get("judge_consistent")
    if consistent:
        yes, total = consistent.get(True, 0), sum(v for k, v in consistent.items() if k is not None)
        parts.append(f"<p>Position-consistent verdicts (same winner in both orders): <b>{yes:,} of {total:,} "
                     f"({_pct(yes, total)})</b></p>")
    gap = summary.values("length_gap")
    if gap.size:
        longer, shorter = int((gap > 0).sum()), int((gap < 0).sum())
        parts.append(f"<p>Length bias: chosen is longer than rejected in <b>{longer:,} of {gap.size:,} pairs "
                     f"({_pct(longer, gap.size)})</b>, shorter in {shorter:,} ({_pct(shorter, gap.size)}).</p>")
    prob = summary.values("judge_prob")
    if prob.size and summary.kind == "pairwise":
        agree, tie = int((prob > 0.5).sum()), int((prob == 0.5).sum())
        parts.append(f"<p>Judge agrees with the stored preference (P(chosen better) &gt; 0.5): <b>{agree:,} of "
                     f"{prob.size:,} ({_pct(agree, prob.size)})</b>; undecided (exactly 0.5): {tie:,}</p>")
    agreement = summary.values("agreement")
    if agreement.size:
        parts.append(f"<p>Mean annotator agreement: <b>{agreement.mean():.3f}</b> over {agreement.size:,} items</p>")
    return "".join(parts)


def render(dataset: Path, manifest: dict, summary: Summary, examples: list[dict], sampled: Sampled,
           quarantine: tuple[Path, Summary, list[dict]] | None, checksums: str) -> str:
    kind, prov = manifest["kind"], manifest.get("provenance", {})
    title = f"{dataset.name} · {kind} · {manifest['num_rows']:,} rows"
    overview = [("kind", html.escape(kind)), ("rows", _num(manifest["num_rows"])),
                ("shards", _num(len(manifest.get("shards", [])))), ("schema version", html.escape(str(manifest.get("schema_version")))),
                ("created", html.escape(str(manifest.get("created_at", "?")))), ("checksums", checksums),
                ("written by", html.escape(str(prov.get("flow", "?"))))]
    for key in ("source_format", "source_file", "target_format", "source_sha256", "model", "judge", "seed"):
        if prov.get(key) is not None:
            overview.append((key.replace("_", " "), html.escape(_short(str(prov[key]), 120))))
    sections = [f'<section><h2>Dataset</h2>{_table(overview)}'
                + (f'<p class="note">{html.escape(sampled.note)}</p>' if sampled.note else "") + "</section>"]
    sections.append(f"<section><h2>Accounting</h2>{_accounting(manifest)}</section>")
    if quarantine is not None:
        qpath, qsum, qrows = quarantine
        reasons = qsum.counts.get("reason", {})
        body = (f"<p>{qsum.rows:,} quarantined rows in <code>{html.escape(str(qpath))}</code> (a row may stand for "
                f"several source records, e.g. one item's annotators)</p>"
                + (bar_chart(dict(reasons), "Quarantine reasons") if reasons else "")
                + "".join(render_example(QUARANTINE_KIND, r, i + 1) for i, r in enumerate(qrows)))
        sections.append(f"<section><h2>Quarantine</h2>{body}</section>")
    elif kind != QUARANTINE_KIND:
        acc = prov.get("accounting") or {}
        hint = " (the conversion quarantined rows; pass --quarantine PATH to show them)" if acc.get("quarantined") else ""
        sections.append(f"<section><h2>Quarantine</h2><p>No quarantine dataset found beside this one{hint}.</p></section>")
    plots = []
    for title_, names in PLOTS:
        series = {SERIES[n].split(" (")[0]: summary.values(n) for n in names if summary.values(n).size}
        if series:
            xlabel = SERIES[names[0]].split(" (")[1].rstrip(")") if " (" in SERIES[names[0]] else SERIES[names[0]]
            plots.append(histogram(series, title_, xlabel))
    counts = []
    for name, label in (("source", "Rows per source"), ("model", "Rows per model"), ("label", "Labels"),
                        ("judge_consistent", "Judge position-consistent"), ("role", "Prompt turns per role"),
                        ("reason", "Quarantine reasons")):
        c = {("(none)" if k is None else k): v for k, v in summary.counts.get(name, {}).items()}
        if c:
            counts.append(bar_chart(c, label))
    if plots or counts:
        sections.append(f'<section><h2>Distributions</h2><div class="grid">{"".join(plots + counts)}</div>'
                        f'<h3>Summary statistics</h3>{_stats_table(summary)}</section>')
    ties, judge = _ties(summary, manifest), _judge(summary)
    if ties or judge:
        sections.append(f"<section><h2>Ties, length bias and judges</h2>{ties}{judge}</section>")
    if examples:
        sections.append(f'<section><h2>Examples</h2><p class="meta">{len(examples)} rows chosen at random from the '
                        f'first rows read.</p>{"".join(render_example(kind, r, i + 1) for i, r in enumerate(examples))}'
                        "</section>")
    columns = _table([(html.escape(k), html.escape(str(v))) for k, v in manifest.get("columns", {}).items()],
                     ("column", "type"))
    sections.append(f"<section><h2>Columns and provenance</h2>{columns}<details><summary>provenance</summary><pre>"
                    f"{_text(json.dumps(prov, indent=2, default=str), 20000)}</pre></details></section>")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(str(dataset))} · report written {now} by "
            f"alignflow report</p></header><main>{''.join(sections)}</main></body></html>\n")


def build_report(dataset: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 quarantine: str | os.PathLike | None = None, max_rows: int = MAX_ROWS, examples: int = EXAMPLES,
                 seed: int = 0, verify: bool = True) -> Report:
    """Write the HTML report of ``dataset`` to ``out`` (default: ``<dataset>.report.html`` beside it)."""
    dataset = Path(dataset)
    manifest = verify_dataset(dataset) if verify else read_manifest(dataset)
    checksums = "verified" if verify else "not checked"
    kind = manifest["kind"]
    files, sampled = _sample_shards(shard_paths(dataset, verify=False), max_rows, seed)
    summary, rows = _examples_and_summary(kind, files, max_rows, examples, seed)
    q = Path(quarantine) if quarantine is not None else (find_quarantine(dataset, manifest) if kind != QUARANTINE_KIND else None)
    q_part = None
    if q is not None:
        q_manifest = read_manifest(q)
        if q_manifest["kind"] != QUARANTINE_KIND:
            raise ValueError(f"{q}: kind {q_manifest['kind']!r}, not a quarantine dataset")
        q_files, _ = _sample_shards(shard_paths(q, verify=False), max_rows, seed)
        q_summary, q_rows = _examples_and_summary(QUARANTINE_KIND, q_files, max_rows, examples, seed)
        q_part = (q, q_summary, q_rows)
    page = render(dataset, manifest, summary, rows, sampled, q_part, checksums)
    out = Path(out) if out is not None else dataset.with_name(dataset.name + ".report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return Report(out, dataset, kind, manifest["num_rows"], sampled, q)


LOADING_TAGS = {"script", "link", "iframe", "frame", "object", "embed", "base", "audio", "video", "source", "track"}
URL_ATTRS = {"src", "href", "action", "formaction", "poster", "data", "srcset", "background", "xlink:href", "ping"}
CSS_FETCH = re.compile(r"url\(\s*['\"]?(?!data:|#)|@import", re.I)


def external_references(page: str) -> list[str]:
    """What in ``page`` would make a browser fetch (or run) anything: tags that load or run
    (script, link, iframe, ...), URL attributes other than ``data:`` URIs and ``#`` anchors, CSS
    ``url()`` / ``@import``, and the same inside embedded SVG images. Empty when self-contained."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Scan(HTMLParser):
        in_style = False

        def handle_starttag(self, tag, attrs):
            if tag in LOADING_TAGS:
                found.append(f"<{tag}>")
            for name, value in attrs:
                value = (value or "").strip()
                if name in URL_ATTRS and not value.startswith(("data:", "#")):
                    found.append(f"<{tag} {name}={value[:80]!r}>")
                if name == "style" and CSS_FETCH.search(value):
                    found.append(f"<{tag} style={value[:80]!r}>")
                if name in URL_ATTRS and value.startswith("data:image/svg+xml;base64,"):
                    svg = base64.b64decode(value.split(",", 1)[1]).decode("utf-8", "replace")
                    found.extend(f"in an embedded SVG: {hit}" for hit in external_references(_svg_body(svg)))
            self.in_style = tag == "style"

        def handle_endtag(self, tag):
            self.in_style = False

        def handle_data(self, data):
            if self.in_style and CSS_FETCH.search(data):
                found.append(f"<style>: {CSS_FETCH.search(data).group()}")

    Scan(convert_charrefs=True).feed(page)
    return found


def _svg_body(svg: str) -> str:
    """An SVG document without its XML prolog (the DOCTYPE names a DTD that no browser fetches)."""
    return svg[svg.find("<svg"):] if "<svg" in svg else svg
