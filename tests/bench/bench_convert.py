"""Benchmark: ``alignflow convert`` against DuckDB doing the same job in SQL, whole processes.

Three jobs, each run by both engines on the same input, writing the same columns as zstd Parquet:

- ``nectar``: 40,000 Nectar-style rows (an HH-style prompt, 7 answers ranked 1..7) -> all 21
  pairs per row = 840,000 rows of TRL preference Parquet (prompt, chosen, rejected, margin).
  ``alignflow convert IN OUT.parquet --from nectar --to trl-preference``.
- ``hh``: the real HH-RLHF harmless test file (2,312 transcripts) -> TRL preference Parquet in the
  conversational style (prompt turns as messages, chosen/rejected as one assistant message);
  rows whose transcripts diverge before the last answer, or with an empty answer, are left out
  on both sides.
- ``listwise``: 1,000,000 synthetic listwise rows (Parquet, K = 4..9 responses) -> all pairs
  without ties (19.3M rows): ours into a store dataset (``--to pairwise``, shards + manifest),
  DuckDB into one Parquet file with the same columns.

Each process is started from here and timed as a whole (interpreter start and imports count);
wall time, CPU time (user + system, all threads) and peak RSS come from ``wait4``. The two
engines alternate (which goes first swaps every round) and the best of ``--repeats`` rounds is
compared, so a burst of load from other jobs on the machine hits both alike. For nectar and hh each
engine also runs the same job on 20 rows: its fixed cost (interpreter, imports, opening and
closing files), printed beside what the rest of the work takes. Outputs are
checked to hold the same rows (the whole output for nectar and hh, a sample of prompts for
listwise).

    python tests/bench/bench_convert.py [--repeats 5] [--jobs nectar,hh,listwise]
                                        [--listwise-rows 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
HH_FILE = Path("/work/shared/data/human-labels/hh-rlhf_harmless-base_test.jsonl.gz")
WORDS = np.array(("the a model answer is good bad helpful wrong right because therefore maybe not very quite "
                  "clear short long python code test value list row pair score rank first second third last "
                  "alpha beta gamma delta data label human policy reward").split(), dtype=object)
K_MIN, K_MAX = 4, 9
FEW_ROWS = 20  # the fixed-cost run: the same job on this many rows

# -- inputs --------------------------------------------------------------------------------------


def _sentences(rng: np.random.Generator, n: int, min_words: int, max_words: int) -> list[str]:
    counts = rng.integers(min_words, max_words + 1, n)
    words = WORDS[rng.integers(0, len(WORDS), int(counts.sum()))]
    ends = np.cumsum(counts)
    return [" ".join(words[e - c:e]) for c, e in zip(counts, ends)]


def make_nectar(path: Path, rows: int = 40_000, seed: int = 0) -> None:
    """Nectar's shape: prompt ``\\n\\nHuman: ...\\n\\nAssistant:``, 7 answers {answer, model, rank}
    ranked 1 (best) .. 7, plus the file's other fields. Prompts 8-30 words, answers 10-40 words."""
    rng = np.random.default_rng(seed)
    prompts = _sentences(rng, rows, 8, 30)
    answers = _sentences(rng, rows * 7, 10, 40)
    with open(path, "w") as fh:
        for i in range(rows):
            ranks = rng.permutation(7) + 1
            record = {"prompt": f"\n\nHuman: {prompts[i]} (#{i})?\n\nAssistant: ",
                      "answers": [{"answer": f"{answers[7 * i + k]} ({i}.{k})", "model": f"model-{k}", "rank": int(r)}
                                  for k, r in enumerate(ranks)],
                      "turns": 1, "num_responses": 7, "source": ["sharegpt"], "good_natured": True}
            fh.write(json.dumps(record) + "\n")


def make_listwise(path: Path, rows: int, seed: int = 0, batch: int = 200_000) -> None:
    """``rows`` synthetic listwise rows (prompt_id given, K uniform in 4..9) in one Parquet file."""
    sys.path.insert(0, str(REPO))
    from alignflow.schemas.kinds import MESSAGE, MESSAGES

    rng = np.random.default_rng(seed)
    writer = None

    def sentences(n: int, n_words: int) -> pa.Array:
        cols = [pa.array(WORDS[rng.integers(0, len(WORDS), n)], pa.string()) for _ in range(n_words)]
        ids = pa.array(rng.integers(0, 1 << 30, n).astype(str).astype(object), pa.string())
        return pc.binary_join_element_wise(*cols, ids, " ")

    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        k = rng.integers(K_MIN, K_MAX + 1, n)
        offsets = pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32))
        prompt = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.StructArray.from_arrays(
            [pa.array(np.full(n, "user", dtype=object), pa.string()), sentences(n, 6)], fields=list(MESSAGE)),
            type=MESSAGES)
        table = pa.table({
            "prompt_id": pa.array(np.char.add("p", np.arange(start, start + n).astype(str)).astype(object), pa.string()),
            "prompt": prompt,
            "responses": pa.ListArray.from_arrays(offsets, sentences(int(k.sum()), 5)),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(np.round(rng.uniform(0, 10, int(k.sum())), 1))),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()


# -- the jobs: our command and DuckDB's SQL ------------------------------------------------------

DUCKDB_SCRIPT = """
import sys, duckdb
con = duckdb.connect()
con.execute(open(sys.argv[1]).read())
"""

NECTAR_SQL = r"""
COPY (
  WITH a AS (
    SELECT trim(regexp_replace(regexp_replace(prompt, '\s*\n\nAssistant:\s*$', ''), '^\s*\n\nHuman:\s*', '')) AS prompt,
           unnest(answers) AS x
    FROM read_json_auto('{src}'))
  SELECT l.prompt, l.x.answer AS chosen, r.x.answer AS rejected, CAST(r.x.rank - l.x.rank AS DOUBLE) AS margin
  FROM a l JOIN a r ON l.prompt = r.prompt AND l.x.rank < r.x.rank
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""

# The prompt is the transcript before its last "\n\nAssistant:"; its turns become messages.
HH_SQL = r"""
COPY (
  WITH t AS (
    SELECT regexp_extract(chosen, '(?s)^(.*)\n\nAssistant:(.*)$', ['prefix', 'answer']) AS c,
           regexp_extract(rejected, '(?s)^(.*)\n\nAssistant:(.*)$', ['prefix', 'answer']) AS r
    FROM read_json_auto('{src}')),
  s AS (
    SELECT c.prefix AS prefix, trim(c.answer) AS chosen, trim(r.answer) AS rejected,
           regexp_extract_all(c.prefix, '\n\n(Human|Assistant):', 1) AS roles,
           regexp_split_to_array(c.prefix, '\n\n(?:Human|Assistant):') AS parts
    FROM t WHERE c.prefix = r.prefix AND trim(c.answer) <> '' AND trim(r.answer) <> '')
  SELECT list_transform(range(1, len(roles) + 1),
           lambda i: {{'role': CASE roles[i] WHEN 'Human' THEN 'user' ELSE 'assistant' END, 'content': trim(parts[i + 1])}})
           AS prompt,
         [{{'role': 'assistant', 'content': chosen}}] AS chosen,
         [{{'role': 'assistant', 'content': rejected}}] AS rejected
  FROM s
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""

LISTWISE_SQL = r"""
COPY (
  WITH f AS (SELECT prompt_id, prompt, unnest(responses) AS response, unnest(scores) AS score FROM read_parquet('{src}'))
  SELECT l.prompt_id, l.prompt, l.response AS chosen, r.response AS rejected, l.score - r.score AS margin,
         'human' AS source
  FROM f l JOIN f r ON l.prompt_id = r.prompt_id AND l.score > r.score AND l.response <> r.response
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""


def ours_command(src: Path, out: Path, fmt_from: str, fmt_to: str) -> list[str]:
    return [sys.executable, "-m", "alignflow.flows.cli", "convert", str(src), str(out), "--from", fmt_from, "--to", fmt_to]


def duckdb_command(work: Path, name: str, sql: str, src: Path, out: Path) -> list[str]:
    script, query = work / "duckdb_job.py", work / f"{name}.sql"
    script.write_text(DUCKDB_SCRIPT)
    query.write_text(sql.format(src=src, out=out))
    return [sys.executable, str(script), str(query)]


# -- running and timing ------------------------------------------------------------------------


TIME = shutil.which("time") or "/usr/bin/time"


def timed(cmd: list[str], out: Path, checkout: Path = REPO) -> dict:
    """Run ``cmd`` as a whole process under GNU time: wall seconds, CPU seconds (user + sys, all
    threads) and peak RSS (MB). GNU time forks the job itself, so the job's peak RSS is its own
    (a child forked from this process would count this process's memory in its ru_maxrss)."""
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    stats = out.with_name(out.name + ".time")
    # cwd too: ``python -m`` puts the working folder first on sys.path, ahead of PYTHONPATH
    proc = subprocess.run([TIME, "-f", "%e %U %S %M", "-o", str(stats), *cmd], capture_output=True, text=True, env=env,
                          cwd=checkout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    wall, user, system, rss_kb = stats.read_text().split()[-4:]
    return {"wall": float(wall), "cpu": float(user) + float(system), "rss_mb": int(rss_kb) / 1024,
            "stdout": proc.stdout}


def race(ours: list[str], ours_out: Path, duck: list[str], duck_out: Path, repeats: int,
         baseline: Path | None = None) -> dict:
    """Alternate the engines ``repeats`` times (the order reverses every round); ``baseline``: a
    second alignflow checkout run with the same command (e.g. main before a change)."""
    engines = [("ours", ours, ours_out, REPO), ("duckdb", duck, duck_out, REPO)]
    if baseline is not None:
        engines.append(("baseline", ours, ours_out.with_name("baseline-" + ours_out.name), baseline))
    runs: dict[str, list[dict]] = {name: [] for name, *_ in engines}
    for i in range(repeats):
        for engine, cmd, out, checkout in engines if i % 2 == 0 else engines[::-1]:
            cmd = [str(out) if c == str(ours_out) else c for c in cmd]
            runs[engine].append(timed(cmd, out, checkout))
    return runs


def _read_output(path: Path) -> pa.Table:
    if path.is_dir():
        sys.path.insert(0, str(REPO))
        from alignflow.schemas.store import read_dataset

        return read_dataset(path)
    return pq.read_table(path)


def same_rows(ours: Path, duck: Path, columns: list[str], sample_ids: int | None = None) -> str:
    """Do both outputs hold the same rows (as multisets)? Whole outputs, or the rows of the
    first ``sample_ids`` prompt ids."""
    a, b = _read_output(ours), _read_output(duck)
    counts = f"{a.num_rows:,} rows vs {b.num_rows:,}"
    if sample_ids:
        ids = pc.unique(a.column("prompt_id")).slice(0, sample_ids)
        a = a.filter(pc.is_in(a.column("prompt_id"), value_set=ids))
        b = b.filter(pc.is_in(b.column("prompt_id"), value_set=ids))
    a, b = a.select(columns), b.select(columns).cast(a.select(columns).schema)
    key = [(c, "ascending") for c in columns if not pa.types.is_nested(a.schema.field(c).type)]
    if not key:  # sort nested rows by their JSON text
        a = a.append_column("_k", pa.array([json.dumps(r, sort_keys=True) for r in a.to_pylist()]))
        b = b.append_column("_k", pa.array([json.dumps(r, sort_keys=True) for r in b.to_pylist()]))
        key = [("_k", "ascending")]
    same = a.sort_by(key).select(columns).equals(b.sort_by(key).select(columns))
    what = f"rows of {sample_ids} prompts" if sample_ids else "all rows"
    return f"{counts}; {what} {'identical' if same else 'DIFFER'} in {', '.join(columns)}"


def fixed_cost(work: Path, name: str, sql: str, small_src: Path, fmt_from: str, repeats: int) -> dict[str, float]:
    """Best wall of each engine on the same job over a few rows: what a process costs before
    and beside its work (interpreter, imports, argument parsing, opening and closing files)."""
    ours_out, duck_out = work / f"{name}-small-ours.parquet", work / f"{name}-small-duckdb.parquet"
    runs = race(ours_command(small_src, ours_out, fmt_from, "trl-preference"), ours_out,
                duckdb_command(work, f"{name}-small", sql, small_src, duck_out), duck_out, repeats)
    return {engine: min(r["wall"] for r in rs) for engine, rs in runs.items()}


def report(name: str, runs: dict, check: str, fixed: dict[str, float] | None = None) -> dict:
    best = {e: min(r, key=lambda x: x["wall"]) for e, r in runs.items()}
    cpu = {e: min(x["cpu"] for x in r) for e, r in runs.items()}
    rss = {e: max(x["rss_mb"] for x in r) for e, r in runs.items()}
    med = {e: statistics.median(x["wall"] for x in r) for e, r in runs.items()}
    print(f"\n== {name}: {check}")
    print(f"   {'engine':8s} {'best wall':>10s} {'median wall':>12s} {'best CPU':>9s} {'peak RSS':>9s}   walls")
    for e in runs:
        walls = " ".join(f"{x['wall']:.2f}" for x in runs[e])
        print(f"   {e:8s} {best[e]['wall']:9.2f}s {med[e]:11.2f}s {cpu[e]:8.2f}s {rss[e]:7.0f}MB   {walls}")
    ratio, cpu_ratio, mem_ratio = best["ours"]["wall"] / best["duckdb"]["wall"], cpu["ours"] / cpu["duckdb"], \
        rss["ours"] / rss["duckdb"]
    if "baseline" in runs:
        print(f"   ours / baseline checkout: wall {best['ours']['wall'] / best['baseline']['wall']:.2f}x, "
              f"CPU {cpu['ours'] / cpu['baseline']:.2f}x")
    if fixed:
        work = {e: best[e]["wall"] - fixed[e] for e in ("ours", "duckdb")}
        print(f"   fixed cost (the same job on {FEW_ROWS} rows): ours {fixed['ours']:.2f}s, DuckDB {fixed['duckdb']:.2f}s; "
              f"the rest: ours {work['ours']:.2f}s, DuckDB {work['duckdb']:.2f}s ({work['ours'] / work['duckdb']:.2f}x)")
    met = ratio <= 1.0 and mem_ratio <= 1.2
    print(f"   ours / DuckDB: wall {ratio:.2f}x (median {med['ours'] / med['duckdb']:.2f}x), CPU {cpu_ratio:.2f}x, "
          f"peak memory {mem_ratio:.2f}x -> goal (wall <= 1.0x at <= 1.2x memory): {'met' if met else 'NOT met'}")
    return {"job": name, "wall_ratio": ratio, "cpu_ratio": cpu_ratio, "mem_ratio": mem_ratio, "met": met}


# What the fixed cost is made of: imports alone, each a bare process (cumulative, in the order a conversion needs them).
START_UP = (
    ("python alone", "pass"),
    ("+ the CLI (typer)", "import alignflow.flows.cli"),
    ("+ typer's per-option pydantic adapters", "import alignflow.flows.cli, typer._adapters"),
    ("+ numpy", "import alignflow.flows.cli, typer._adapters, numpy"),
    ("+ pyarrow (compute, json, parquet) and our label code",
     "import alignflow.flows.cli, typer._adapters, numpy, pyarrow.compute, pyarrow.json, pyarrow.parquet, "
     "alignflow.feedback.labels"),
    ("DuckDB: python + import duckdb", "import duckdb"),
)


def start_up(repeats: int) -> None:
    """Each line of START_UP as a whole process, best of ``max(repeats, 5)``, alternating."""
    env = dict(os.environ, ARROW_DEFAULT_MEMORY_POOL="jemalloc",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    best = {name: float("inf") for name, _ in START_UP}
    for _ in range(max(repeats, 5)):
        for name, code in START_UP:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
            best[name] = min(best[name], time.perf_counter() - t0)
    print("\nstart-up, imports alone (whole processes, best of "
          f"{max(repeats, 5)}): " + ";  ".join(f"{name} {best[name]:.3f}s" for name, _ in START_UP))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--jobs", default="nectar,hh,listwise")
    ap.add_argument("--nectar-rows", type=int, default=40_000)
    ap.add_argument("--listwise-rows", type=int, default=1_000_000)
    ap.add_argument("--listwise-repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="keep inputs here between runs (default: a temporary folder)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another alignflow checkout to time with the same commands (e.g. /work/main)")
    args = ap.parse_args()
    import duckdb

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    from _measure import compile_checkout

    for checkout in [REPO] + ([args.baseline] if args.baseline else []):
        print(compile_checkout(checkout))
    jobs = args.jobs.split(",")
    print(f"cores: {os.cpu_count()}  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  "
          f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}, python {sys.version.split()[0]}  workdir: {work}")
    results = []
    if "nectar" in jobs:
        src = work / f"nectar-{args.nectar_rows}.jsonl"
        if not src.exists():
            make_nectar(src, args.nectar_rows)
        ours_out, duck_out = work / "nectar-ours.parquet", work / "nectar-duckdb.parquet"
        runs = race(ours_command(src, ours_out, "nectar", "trl-preference"), ours_out,
                    duckdb_command(work, "nectar", NECTAR_SQL, src, duck_out), duck_out, args.repeats, args.baseline)
        check = same_rows(ours_out, duck_out, ["prompt", "chosen", "rejected", "margin"])
        print(f"\nours: {runs['ours'][-1]['stdout'].splitlines()[0]}")
        small = work / f"nectar-{FEW_ROWS}.jsonl"
        make_nectar(small, FEW_ROWS)
        fixed = fixed_cost(work, "nectar", NECTAR_SQL, small, "nectar", args.repeats)
        results.append(report(f"nectar ({args.nectar_rows:,} rows x 7 answers -> TRL preference Parquet, "
                              f"{src.stat().st_size / 1e6:.0f} MB JSONL)", runs, check, fixed))
    if "hh" in jobs:
        src = work / HH_FILE.name
        if not src.exists():
            shutil.copy(HH_FILE, src)
        ours_out, duck_out = work / "hh-ours.parquet", work / "hh-duckdb.parquet"
        runs = race(ours_command(src, ours_out, "hh-rlhf", "trl-preference"), ours_out,
                    duckdb_command(work, "hh", HH_SQL, src, duck_out), duck_out, args.repeats, args.baseline)
        check = same_rows(ours_out, duck_out, ["prompt", "chosen", "rejected"])
        print(f"\nours: {runs['ours'][-1]['stdout'].splitlines()[0]}")
        with gzip.open(src) as fh:
            lines = fh.readlines()
        small = work / f"hh-{FEW_ROWS}.jsonl.gz"
        with gzip.open(small, "wb") as fh:
            fh.writelines(lines[:FEW_ROWS])
        fixed = fixed_cost(work, "hh", HH_SQL, small, "hh-rlhf", args.repeats)
        results.append(report(f"hh-rlhf harmless test ({len(lines):,} rows -> TRL preference Parquet, conversational)",
                              runs, check, fixed))
    if "listwise" in jobs:
        src = work / f"listwise-{args.listwise_rows}.parquet"
        if not src.exists():
            make_listwise(src, args.listwise_rows)
        ours_out, duck_out = work / "listwise-ours", work / "listwise-duckdb.parquet"
        runs = race(ours_command(src, ours_out, "listwise", "pairwise"), ours_out,
                    duckdb_command(work, "listwise", LISTWISE_SQL, src, duck_out), duck_out, args.listwise_repeats, args.baseline)
        check = same_rows(ours_out, duck_out, ["prompt_id", "chosen", "rejected", "margin"], sample_ids=2000)
        print(f"\nours: {runs['ours'][-1]['stdout'].splitlines()[0]}")
        results.append(report(f"listwise ({args.listwise_rows:,} rows, K 4..9 -> all pairs; ours a store dataset, "
                              f"DuckDB one Parquet file)", runs, check))
    if "nectar" in jobs or "hh" in jobs:
        start_up(args.repeats)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in results:
        print(f"{r['job'].split(' ')[0]:9s} wall {r['wall_ratio']:.2f}x  CPU {r['cpu_ratio']:.2f}x  "
              f"memory {r['mem_ratio']:.2f}x  goal {'met' if r['met'] else 'NOT met'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
