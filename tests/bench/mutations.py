"""Deliberate bugs, and the tests that must catch them (issue 14: a test earns its place only if
it fails when the method is broken).

Each mutation replaces one line of the code in a throw-away copy of this checkout, runs the
tests named beside it there, and reports whether they failed (they must). The checkout itself
is never touched, so a killed run leaves nothing broken behind.

    python tests/bench/mutations.py            # every mutation (about 3 minutes on 2 cores)
    python tests/bench/mutations.py PAFT GAE   # those whose name holds one of the words
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (what the bug is, file, the line's text, the bug's text, tests that must fail)
MUTATIONS = [
    ("RSO deduplicates the samples (drops eq. 4's pi_sft factor)", "feedback/rejection.py",
     "_groups(samples, reward, unique=False)", "_groups(samples, reward, unique=True)",
     ["tests/test_rejection.py::test_rso_accepts_from_the_tilted_target",
      "tests/test_rejection.py::test_rso_pairs_keep_the_multiplicity_of_the_samples"]),
    ("temperature enhancer pairs best vs worst over the union", "trainers/online/iterative.py",
     'if cfg.enhancer == "temperature":  # main', "if False:  # main",
     ["tests/test_iterative_pairs.py::test_temperature_enhancer_pairs_main_against_enhancer"]),
    ("PAFT's L1 term on the LoRA factors, not on dW", "trainers/online/paft.py",
     "return (b @ a).abs().sum()", "return b.abs().sum() + a.abs().sum()",
     ["tests/test_paft.py::test_l1_term_is_on_the_sft_delta"]),
    ("PAFT merges with weights 10% off", "trainers/online/paft.py",
     "list(cfg.weights), adapter_name", "[0.9 * w for w in cfg.weights], adapter_name",
     ["tests/test_paft.py::test_merge_is_the_pretrained_weights_plus_both_deltas"]),
    ("ptx loss with its mask shifted by one token", "trainers/online/ppo.py",
     "return -masked_mean(logps, attention_mask[:, 1:].bool())",
     "return -masked_mean(logps, attention_mask[:, :-1].bool())",
     ["tests/test_online_math.py::test_ptx_loss_is_the_mean_token_nll_of_the_text"]),
    ("GAE without lambda", "trainers/online/ppo.py",
     "(delta + gamma * lam * next_adv)", "(delta + gamma * next_adv)",
     ["tests/test_online_math.py::test_gae_matches_hand_computation",
      "tests/test_online_math.py::test_value_head_gae_by_hand"]),
    ("termination: every win-rate counts as significant", "trainers/online/termination.py",
     '"significant": bool(n and p_value < alpha)', '"significant": True',
     ["tests/test_termination.py"]),
    ("iterative CRINGE without its negative term (alpha ignored)", "trainers/online/iterative.py",
     'compute_loss("cringe", binary, alpha=alpha, k=k)', 'compute_loss("cringe", binary, alpha=0.0, k=k)',
     ["tests/test_online_cringe.py::test_negative_term_lowers_the_probability_of_the_contrasted_tokens"]),
    ("PPO's KL penalty off (beta ignored)", "trainers/online/ppo.py",
     "rewards = -beta * kl", "rewards = -0.0 * kl",
     ["tests/test_online.py::test_ppo_kl_penalty_keeps_the_policy_nearer_the_reference"]),
    ("reward-guided beam search scores with half the reference (eq. 23's log-ratio broken)",
     "trainers/token_rewards.py",
     "else beta * (dec.logps - ref_dec.logps.to(dec.logps.device))",
     "else beta * (dec.logps - 0.5 * ref_dec.logps.to(dec.logps.device))",
     ["tests/test_token_rewards.py::test_score_is_the_objective_of_the_answer_and_batching_changes_nothing"]),
    ("Nash-MD's opponent is pi_ref alone (the mixture of eq. 58 ignored)", "trainers/online/nash_md.py",
     "mixture_logits(outs[0].logits[:, -1], outs[1].logits[:, -1], mix)",
     "mixture_logits(outs[0].logits[:, -1], outs[1].logits[:, -1], 1.0)",
     ["tests/test_nash_intransitive.py::test_nash_methods_approach_the_mixed_equilibrium_where_bt_dpo_does_not"
      "[nash-md]"]),
]


def run(copy: Path, name: str, path: str, line: str, bug: str, tests: list[str]) -> bool:
    target = copy / path
    original = target.read_text()
    if original.count(line) != 1:
        raise SystemExit(f"{path}: the line of mutation {name!r} is not there exactly once; update MUTATIONS")
    target.write_text(original.replace(line, bug))
    try:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=copy, capture_output=True, text=True)
        summary = [x for x in done.stdout.splitlines() if x.strip()][-1:] or ["(no output)"]
        caught = done.returncode == 1  # 1: tests ran and failed (2-5: errors, nothing collected)
        print(f"{'caught' if caught else 'MISSED'}  {name}  ({time.perf_counter() - started:.0f} s: {summary[0]})",
              flush=True)
        return caught
    finally:
        target.write_text(original)


def main() -> None:
    words = sys.argv[1:]
    chosen = [m for m in MUTATIONS if not words or any(w.lower() in m[0].lower() for w in words)]
    with tempfile.TemporaryDirectory(prefix="alignflow-mutations-") as tmp:
        copy = Path(tmp) / "checkout"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info"))
        caught = sum(run(copy, *m) for m in chosen)
    print(f"{caught} of {len(chosen)} mutations caught")
    sys.exit(0 if caught == len(chosen) else 1)


if __name__ == "__main__":
    main()
