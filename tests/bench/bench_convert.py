"""Benchmark: listwise -> pairwise (all-pairs) through ``alignflow convert``'s library path.

1,000,000 synthetic listwise rows, K uniform in 4..9 (19.3 pairs per row on average), read
from Parquet, validated, expanded to C(K,2) pairs and written as a store dataset. Prints
output pairs/s and the ratio against a baseline written the way people do it today: a per-row
Python function through ``datasets.Dataset.map(batched=False)`` (returning each row's pairs, with
the prompt repeated per pair as in the canonical output, as lists) then ``to_parquet``, measured
in the same run on a 50,000-row subset and compared as a rate (pairs/s, and pairs per
CPU-second since other jobs may share the cores). Peak RSS of the
conversion at 1,000,000 and 4,000,000 rows is measured each in its own subprocess.

    python tests/bench/bench_convert.py [--rows 1000000] [--big-rows 4000000] [--baseline-rows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

K_MIN, K_MAX = 4, 9
WORDS = np.array(("the a model answer is good bad helpful wrong right because therefore maybe not very quite "
                  "clear short long python code test value list row pair score rank first second third last "
                  "alpha beta gamma delta data label human policy reward").split(), dtype=object)


def _sentences(rng: np.random.Generator, n: int, n_words: int) -> pa.Array:
    """n random sentences of n_words words (built column-wise, no per-row Python)."""
    cols = [pa.array(WORDS[rng.integers(0, len(WORDS), n)], pa.string()) for _ in range(n_words)]
    ids = pa.array(rng.integers(0, 1 << 30, n).astype(str).astype(object), pa.string())
    return pc.binary_join_element_wise(*cols, ids, " ")


def make_listwise(path: Path, rows: int, seed: int = 0, batch: int = 200_000) -> None:
    """Write ``rows`` synthetic listwise rows (with prompt_id given) to one Parquet file."""
    from alignflow.schemas.kinds import MESSAGE, MESSAGES

    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        k = rng.integers(K_MIN, K_MAX + 1, n)
        total = int(k.sum())
        offsets = pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32))
        content = _sentences(rng, n, 6)
        prompt = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.StructArray.from_arrays(
            [pa.array(np.full(n, "user", dtype=object), pa.string()), content], fields=list(MESSAGE)), type=MESSAGES)
        table = pa.table({
            "prompt_id": pa.array(np.char.add("p", np.arange(start, start + n).astype(str)).astype(object), pa.string()),
            "prompt": prompt,
            "responses": pa.ListArray.from_arrays(offsets, _sentences(rng, total, 5)),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(np.round(rng.uniform(0, 10, total), 1))),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()


def run_ours(src: Path, out: Path) -> dict:
    """The library conversion (what `alignflow convert --from listwise --to pairwise` runs)."""
    from alignflow.feedback.labels import Options, convert_labels_file

    t0, c0 = time.perf_counter(), time.process_time()
    report = convert_labels_file(src, out, "listwise", "pairwise", Options(strategy="all-pairs"))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "pairs": report.rows_out, "read": report.read, "line": report.line(),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_kernel(src: Path, out: Path) -> dict:
    """The conversion step alone: listwise_to_pairwise on batches already in memory (no IO);
    then, separately, the cost of only writing its output pairs as the store does (zstd Parquet;
    the floor any file -> store conversion pays, whatever its conversion code)."""
    from alignflow.feedback.labels.conversions import listwise_to_pairwise
    from alignflow.schemas.store import write_parquet

    batches = []
    for b in pq.ParquetFile(src).iter_batches(16_384):
        t = pa.Table.from_batches([b])
        batches.append(t.append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = 0
    for t in batches:
        table, _ = listwise_to_pairwise(t, "all-pairs")
        pairs += table.num_rows
        del table
    result = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "pairs": pairs}
    write_seconds = write_cpu = 0.0
    written = 0
    for t in batches[:16]:  # a sample of batches is enough for a rate
        table, _ = listwise_to_pairwise(t, "all-pairs")
        w0, wc0 = time.perf_counter(), time.process_time()
        write_parquet(table, out)
        write_seconds += time.perf_counter() - w0
        write_cpu += time.process_time() - wc0
        written += table.num_rows
    out.unlink(missing_ok=True)
    result.update(write_pairs=written, write_seconds=write_seconds, write_cpu=write_cpu)
    return result


def run_baseline(src: Path, out: Path) -> dict:
    """Per-row Python through datasets.Dataset.map(batched=False), as people write it today."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(str(src))

    def to_pairs(row):
        # the same content as the canonical pairwise output: one (prompt, chosen, rejected,
        # margin) per pair, held as lists because a batched=False map returns one row per row
        resp, sc = row["responses"], row["scores"]
        chosen, rejected, margin = [], [], []
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                if sc[i] == sc[j]:
                    continue
                w, l_ = (i, j) if sc[i] > sc[j] else (j, i)
                chosen.append(resp[w])
                rejected.append(resp[l_])
                margin.append(abs(sc[i] - sc[j]))
        n = len(chosen)
        return {"prompt_ids": [row["prompt_id"]] * n, "prompts": [row["prompt"]] * n, "chosen": chosen,
                "rejected": rejected, "margin": margin, "source": ["human"] * n}

    t0, c0 = time.perf_counter(), time.process_time()
    mapped = ds.map(to_pairs, batched=False, remove_columns=ds.column_names)
    map_seconds, map_cpu = time.perf_counter() - t0, time.process_time() - c0
    mapped.to_parquet(str(out))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    pairs = int(sum(len(p) for p in mapped["chosen"]))
    return {"seconds": seconds, "cpu": cpu, "pairs": pairs, "map_seconds": map_seconds, "map_cpu": map_cpu}


def run_baseline_batched(src: Path, out: Path) -> dict:
    """The faster idiom people also use: ``map(batched=True)`` with a per-row Python loop
    inside that emits one output row per pair, then ``to_parquet``."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(str(src))

    def explode(batch):
        out = {"prompt_id": [], "prompt": [], "chosen": [], "rejected": [], "margin": [], "source": []}
        for pid, prompt, resp, sc in zip(batch["prompt_id"], batch["prompt"], batch["responses"], batch["scores"]):
            for i in range(len(resp)):
                for j in range(i + 1, len(resp)):
                    if sc[i] == sc[j]:
                        continue
                    w, l_ = (i, j) if sc[i] > sc[j] else (j, i)
                    out["prompt_id"].append(pid)
                    out["prompt"].append(prompt)
                    out["chosen"].append(resp[w])
                    out["rejected"].append(resp[l_])
                    out["margin"].append(abs(sc[i] - sc[j]))
                    out["source"].append("human")
        return out

    t0, c0 = time.perf_counter(), time.process_time()
    mapped = ds.map(explode, batched=True, remove_columns=ds.column_names)
    mapped.to_parquet(str(out))
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "pairs": mapped.num_rows}


def _child(args) -> None:
    fn = {"ours": run_ours, "baseline": run_baseline, "baseline-batched": run_baseline_batched,
          "kernel": run_kernel}[args.child]
    print(json.dumps(fn(Path(args.src), Path(args.out))))


def _in_subprocess(which: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--src", str(src), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--big-rows", type=int, default=4_000_000)
    ap.add_argument("--baseline-rows", type=int, default=50_000)
    ap.add_argument("--child")
    ap.add_argument("--src")
    ap.add_argument("--out")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}  load average: {os.getloadavg()[0]:.1f}  workdir: {work}")
    t = time.perf_counter()
    small, big, base_src = work / "listwise-1.parquet", work / "listwise-big.parquet", work / "listwise-base.parquet"
    make_listwise(small, args.rows, seed=0)
    make_listwise(base_src, args.baseline_rows, seed=1)
    print(f"generated {args.rows:,} + {args.baseline_rows:,} rows in {time.perf_counter() - t:.1f}s")

    base = _in_subprocess("baseline", base_src, work / "baseline.parquet")
    base_rate = base["pairs"] / base["seconds"]
    base_cpu_rate = base["pairs"] / base["cpu"]
    print(f"baseline (datasets.map, batched=False, per-row Python) on {args.baseline_rows:,} rows: "
          f"{base['pairs']:,} pairs in {base['seconds']:.2f}s wall / {base['cpu']:.2f}s CPU = {base_rate:,.0f} pairs/s "
          f"({base_cpu_rate:,.0f} per CPU-second; rate taken as the full-size rate)")
    fast = _in_subprocess("baseline-batched", base_src, work / "baseline-batched.parquet")
    fast_rate, fast_cpu_rate = fast["pairs"] / fast["seconds"], fast["pairs"] / fast["cpu"]
    print(f"second baseline (datasets.map, batched=True, per-row Python loop inside, one row per pair): "
          f"{fast['pairs']:,} pairs in {fast['seconds']:.2f}s wall / {fast['cpu']:.2f}s CPU = {fast_rate:,.0f} pairs/s "
          f"({fast_cpu_rate:,.0f} per CPU-second)")

    ours = _in_subprocess("ours", small, work / "pairs-1")
    rate = ours["pairs"] / ours["seconds"]
    cpu_rate = ours["pairs"] / ours["cpu"]
    print(f"alignflow convert on {args.rows:,} rows: {ours['line']}")
    print(f"  {ours['pairs']:,} pairs in {ours['seconds']:.2f}s wall / {ours['cpu']:.2f}s CPU (all threads) = "
          f"{rate:,.0f} pairs/s ({cpu_rate:,.0f} per CPU-second); peak RSS {ours['maxrss_mb']:.0f} MB")
    print(f"  ratio vs baseline: {rate / base_rate:.1f}x wall-clock, {cpu_rate / base_cpu_rate:.1f}x per CPU-second")
    print(f"  ratio vs the second (batched) baseline: {rate / fast_rate:.1f}x wall-clock, "
          f"{cpu_rate / fast_cpu_rate:.1f}x per CPU-second")
    shutil.rmtree(work / "pairs-1", ignore_errors=True)
    kernel = _in_subprocess("kernel", small, work / "unused")
    k_rate, k_cpu_rate = kernel["pairs"] / kernel["seconds"], kernel["pairs"] / kernel["cpu"]
    b_map_rate, b_map_cpu_rate = base["pairs"] / base["map_seconds"], base["pairs"] / base["map_cpu"]
    print(f"conversion step only (no file IO; baseline: the map call without to_parquet): "
          f"{k_rate:,.0f} pairs/s ({k_cpu_rate:,.0f} per CPU-second) vs baseline {b_map_rate:,.0f} pairs/s "
          f"({b_map_cpu_rate:,.0f} per CPU-second): {k_rate / b_map_rate:.1f}x wall-clock, "
          f"{k_cpu_rate / b_map_cpu_rate:.1f}x per CPU-second")
    w_cpu_rate = kernel["write_pairs"] / kernel["write_cpu"]
    print(f"writing the output pairs alone (the store's zstd Parquet, {kernel['write_pairs']:,} pairs): "
          f"{w_cpu_rate:,.0f} pairs per CPU-second; with read, validate and convert costing nothing and both "
          f"cores busy writing, the end-to-end ceiling would be {2 * w_cpu_rate / base_cpu_rate:.1f}x the "
          f"(single-threaded) baseline's per-CPU-second rate")

    if args.big_rows:
        make_listwise(big, args.big_rows, seed=2)
        big_run = _in_subprocess("ours", big, work / "pairs-big")
        print(f"alignflow convert on {args.big_rows:,} rows: {big_run['pairs']:,} pairs in {big_run['seconds']:.1f}s wall "
              f"/ {big_run['cpu']:.1f}s CPU = {big_run['pairs'] / big_run['seconds']:,.0f} pairs/s "
              f"({big_run['pairs'] / big_run['cpu']:,.0f} per CPU-second); peak RSS {big_run['maxrss_mb']:.0f} MB")
        growth = big_run["maxrss_mb"] / ours["maxrss_mb"] - 1
        print(f"peak RSS {args.rows:,} rows: {ours['maxrss_mb']:.0f} MB; {args.big_rows:,} rows: "
              f"{big_run['maxrss_mb']:.0f} MB ({100 * growth:+.1f}%; goal within 20%)")
        shutil.rmtree(work / "pairs-big", ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other jobs share these cores; wall-clock rates "
          f"shrink with load, per-CPU-second rates much less)")
    print(f"goals (end to end, file -> validated -> store dataset): >= 30x baseline: "
          f"{'met' if rate / base_rate >= 30 else 'NOT met'} ({rate / base_rate:.1f}x wall, {cpu_rate / base_cpu_rate:.1f}x "
          f"per CPU-second); >= 1,000,000 pairs/s: {'met' if rate >= 1e6 else 'NOT met'} ({rate:,.0f} wall, "
          f"{cpu_rate:,.0f} per CPU-second)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
