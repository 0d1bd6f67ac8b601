"""Benchmark: ``alignflow train --loss dpo`` against TRL's DPOTrainer on the same model and data.

Same tiny model (char-level Llama, hidden size 256, 2 layers), the same 1,000 synthetic pairs
(60-character prompts, 80-character responses), CPU, batch size 8, 1 epoch, same learning rate.
Every configuration runs in its own subprocess; for each we report

- ``train_s``: ``Trainer.train()`` alone (``train_runtime``),
- ``total_s``: from the start of the work (after imports) to the end of training, i.e.
  tokenization + reference pass + training; for alignflow the separate ``precompute-ref``
  process is added to it,
- ``process_s``: the whole subprocess(es) wall time, imports included,
- ``cpu_s``: user + system CPU time of the subprocess(es) (steadier than wall time on a shared
  machine),
- ``peak_rss_mb``: the peak resident memory of the (largest) subprocess,

and the ratios against TRL's default DPOTrainer measured in the same run. TRL runs with its own
defaults (``trl_default``, ``trl_precompute`` with ``precompute_ref_log_probs=True``: bf16
autocast and gradient checkpointing on, as TRL ships them). ``ours`` trains with ``--bf16 true``, the
mixed precision TRL uses by default (bf16 autocast; this CPU has AVX512-BF16), from float32
reference columns; ``ours_fp32`` and ``trl_fp32*`` (float32, no gradient checkpointing) are the
like-for-like float32 pair.

    python tests/bench/bench_dpo.py                 # all configurations, once each
    python tests/bench/bench_dpo.py --repeats 2 --only ours,trl_default,trl_precompute
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's packages, whatever the editable install points at
N_PAIRS, PROMPT_CHARS, RESPONSE_CHARS, BATCH, LR, BETA = 1000, 60, 80, 8, 5e-6, 0.1
CONFIGS = ("ours", "trl_default", "trl_precompute", "ours_fp32", "trl_fp32", "trl_fp32_precompute", "ours_plain")


def synthetic_pairs(seed: int = 0, n: int = N_PAIRS) -> list[dict]:
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "     "

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return [{"prompt": text(PROMPT_CHARS), "chosen": text(RESPONSE_CHARS), "rejected": text(RESPONSE_CHARS)}
            for _ in range(n)]


def prepare(workdir: Path, n: int = N_PAIRS) -> None:
    """The model checkpoint and the dataset (store format for alignflow, JSON for TRL)."""
    import pyarrow as pa

    from alignflow.schemas.store import write_dataset
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint

    tok = make_char_tokenizer(model_max_length=512)
    model = make_tiny_llama(tok, hidden_size=256, num_layers=2, max_position_embeddings=512, seed=0)
    save_checkpoint(model, tok, workdir / "model")
    pairs = synthetic_pairs(n=n)
    (workdir / "pairs.json").write_text(json.dumps(pairs))
    table = pa.table({"prompt": [p["prompt"] for p in pairs], "chosen": [p["chosen"] for p in pairs],
                      "rejected": [p["rejected"] for p in pairs], "margin": pa.nulls(len(pairs), pa.float64()),
                      "source": ["rule"] * len(pairs)})
    write_dataset(workdir / "pairs", table, "pairwise", {"flow": "bench_dpo"}, overwrite=True)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time and the child's own peak RSS (os.wait4, not all children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "output": out}


def _result_line(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"no BENCH_RESULT in output:\n{output[-3000:]}")


def run_ours(workdir: Path, layout: str = "packed", bf16: bool = True) -> dict:
    data = workdir / f"pairs_ref_{layout}"
    pre = run_measured([sys.executable, "-m", "alignflow.flows.cli", "precompute-ref", str(workdir / "pairs"),
                        "--model", str(workdir / "model"), "--output", str(data)])
    out_dir = workdir / f"out_ours_{layout}"
    train = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", "ours", "--workdir", str(workdir),
                          "--data", str(data), "--out", str(out_dir), "--layout", layout, "--bf16", str(bf16).lower()])
    res = _result_line(train["output"])
    return {"train_s": res["train_s"], "total_s": res["total_s"] + pre["wall_s"],
            "process_s": pre["wall_s"] + train["wall_s"], "peak_rss_mb": max(pre["peak_rss_mb"], train["peak_rss_mb"]),
            "cpu_s": pre["cpu_s"] + train["cpu_s"], "precompute_process_s": pre["wall_s"], "final_loss": res["loss"]}


def run_trl(workdir: Path, precompute: bool, fp32: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--workdir", str(workdir)]
    if precompute:
        cmd.append("--precompute")
    if fp32:
        cmd.append("--fp32")
    r = run_measured(cmd)
    res = _result_line(r["output"])
    return {"train_s": res["train_s"], "total_s": res["total_s"], "process_s": r["wall_s"],
            "cpu_s": r["cpu_s"], "peak_rss_mb": r["peak_rss_mb"], "final_loss": res["loss"]}


# ---- workers (run inside the measured subprocess) -----------------------------------------------

def worker_ours(workdir: Path, data: Path, out: Path, layout: str, bf16: str) -> None:
    """What ``alignflow train DATA --model M --loss dpo --output OUT --per_device_train_batch_size 8
    --num_train_epochs 1 --learning_rate 5e-6`` runs, with the training time reported."""
    import torch  # noqa: F401  (imports before the clock starts, as in the TRL worker)
    import transformers  # noqa: F401

    from alignflow.flows.cli import app

    start = time.perf_counter()

    argv = ["train", str(data), "--model", str(workdir / "model"), "--loss", "dpo", "--param", f"beta={BETA}",
            "--output", str(out), "--layout", layout, "--per_device_train_batch_size", str(BATCH),
            "--num_train_epochs", "1", "--learning_rate", str(LR), "--disable_tqdm", "true", "--bf16", bf16]
    try:
        code = app(argv, standalone_mode=False)
    except SystemExit as exc:  # typer exits 0 at the end of a command
        code = exc.code
    if code:
        sys.exit(code)
    total = time.perf_counter() - start
    record = json.loads((out / "alignflow_train.json").read_text())
    print("BENCH_RESULT " + json.dumps({"train_s": record["train_runtime_s"], "total_s": total,
                                        "loss": record["train_loss"]}))


def worker_trl(workdir: Path, precompute: bool, fp32: bool) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    pairs = json.loads((workdir / "pairs.json").read_text())
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    extra = {"bf16": False, "gradient_checkpointing": False} if fp32 else {}
    args = DPOConfig(output_dir=str(workdir / f"out_trl_{int(precompute)}_{int(fp32)}"), per_device_train_batch_size=BATCH,
                     num_train_epochs=1, learning_rate=LR, beta=BETA, report_to="none", save_strategy="no",
                     precompute_ref_log_probs=precompute, disable_tqdm=True, use_cpu=True, **extra)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    total = time.perf_counter() - start
    print("BENCH_RESULT " + json.dumps({"train_s": result.metrics["train_runtime"], "total_s": total,
                                        "loss": result.training_loss}))


# ---- orchestration ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "trl"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layout", default="packed")
    ap.add_argument("--precompute", action="store_true")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--bf16", default="true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=N_PAIRS, help="Fewer pairs for a smoke run.")
    ap.add_argument("--only", default="ours,trl_default,trl_precompute,ours_fp32,trl_fp32,trl_fp32_precompute")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    opts = ap.parse_args()
    if opts.worker == "ours":
        return worker_ours(opts.workdir, opts.data, opts.out, opts.layout, opts.bf16)
    if opts.worker == "trl":
        return worker_trl(opts.workdir, opts.precompute, opts.fp32)

    configs = [c.strip() for c in opts.only.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    prepare(workdir, opts.pairs)
    runners = {
        "ours": lambda: run_ours(workdir, "packed"),
        "ours_plain": lambda: run_ours(workdir, "plain"),
        "ours_fp32": lambda: run_ours(workdir, "packed", bf16=False),
        "trl_default": lambda: run_trl(workdir, precompute=False, fp32=False),
        "trl_precompute": lambda: run_trl(workdir, precompute=True, fp32=False),
        "trl_fp32": lambda: run_trl(workdir, precompute=False, fp32=True),
        "trl_fp32_precompute": lambda: run_trl(workdir, precompute=True, fp32=True),
    }
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(opts.repeats):  # interleaved, so machine load drifts hit every configuration alike
        for c in configs:
            r = runners[c]()
            results[c].append(r)
            print(f"[{rep}] {c}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
    best = {c: {k: min(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
    base = best.get("trl_default")
    print(f"\n{opts.pairs} pairs, prompts {PROMPT_CHARS} chars, responses {RESPONSE_CHARS} chars, batch {BATCH}, "
          f"1 epoch, CPU threads {os.cpu_count()}, best of {opts.repeats}")
    header = f"{'config':<22}{'train_s':>9}{'total_s':>9}{'process_s':>11}{'cpu_s':>8}{'peak_MB':>9}"
    if base:
        header += f"{'train/TRL':>11}{'total/TRL':>11}{'cpu/TRL':>9}{'peak/TRL':>10}"
    print(header)
    for c, r in best.items():
        line = (f"{c:<22}{r['train_s']:>9.1f}{r['total_s']:>9.1f}{r['process_s']:>11.1f}{r['cpu_s']:>8.1f}"
                f"{r['peak_rss_mb']:>9.0f}")
        if base:
            line += (f"{r['train_s'] / base['train_s']:>11.2f}{r['total_s'] / base['total_s']:>11.2f}"
                     f"{r['cpu_s'] / base['cpu_s']:>9.2f}"
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:>10.2f}")
        print(line)
    if "ours" in best and "trl_precompute" in best:
        o, p = best["ours"], best["trl_precompute"]
        print(f"ours vs TRL precompute: train {o['train_s'] / p['train_s']:.2f}, total {o['total_s'] / p['total_s']:.2f}")
    if opts.json:
        opts.json.write_text(json.dumps({"runs": results, "best": best}, indent=2))


if __name__ == "__main__":
    main()
