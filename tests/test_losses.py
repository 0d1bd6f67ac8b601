"""trainers.losses: registry contract, closed-form values, and float64 references.

The references below are written with plain Python ``math`` loops over examples, items and pairs
(never calling trainers.losses), so an error in the vectorized torch code cannot hide in them.
Random batches for every loss are built by ``make_batch``; tests/test_losses_properties.py
reuses it for gradient, invariance and extreme-value checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.trainers.losses import (
    LOSSES,
    BetaDPOState,
    MissingBatchKeyError,
    compute_loss,
    kto_kl_from_mismatched,
    kto_mismatched_indices,
    log1mexp,
    loss_spec,
    pairwise_metrics,
    sequential_kl,
)

LN2 = math.log(2.0)

PAIRWISE_KEYS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")

# Every registered loss with the parameter settings the tests exercise (name, params).
CASES: list[tuple[str, dict]] = [
    ("sft", {}),
    ("dpo", {}),
    ("dpo", {"beta": 0.3, "label_smoothing": 0.2}),
    ("ipo", {"beta": 0.2}),
    ("hinge", {"beta": 0.5}),
    ("slic", {"delta": 2.0, "lam": 0.3}),
    ("dpop", {"beta": 0.2, "lam": 5.0}),
    ("rdpo", {"beta": 0.2, "alpha": 0.05}),
    ("simpo", {"beta": 2.0, "gamma": 0.3}),
    ("orpo", {"lam": 0.5}),
    ("cpo", {"beta": 0.2, "alpha": 0.7}),
    ("fdpo", {"divergence": "reverse_kl", "beta": 0.3}),
    ("fdpo", {"divergence": "forward_kl", "beta": 0.3}),
    ("fdpo", {"divergence": "js", "beta": 0.3}),
    ("fdpo", {"divergence": "alpha", "beta": 0.3, "alpha": 0.3}),
    *[("gpo", {"f": f, "beta": 0.3}) for f in
      ("logistic", "hinge", "square", "exponential", "truncated_square", "savage")],
    ("sppo", {"beta": 0.5}),
    ("beta_dpo", {"beta": 0.2, "alpha": 0.6, "m0": 0.5, "keep_ratio": 0.75}),
    ("tdpo", {"variant": "tdpo1", "beta": 0.3}),
    ("tdpo", {"variant": "tdpo2", "beta": 0.3, "alpha": 0.4}),
    ("kto", {"beta": 0.3, "lambda_d": 1.5, "lambda_u": 0.7}),
    ("npo", {"beta": 0.3}),
    ("dro", {"beta": 0.7}),
    ("cringe", {"alpha": 0.8, "k": 3}),
    ("cringe_pair", {"alpha": 0.8, "k": 3, "b": 1.0, "tau": 2.0}),
    ("nn", {"gamma": 0.3, "alpha": 0.2}),
    ("rrhf", {}),
    ("pro", {"alpha": 0.7}),
    ("pro", {"alpha": 0.7, "score_temperature": True}),
    ("lipo", {"beta": 0.4}),
    ("list_mle", {"beta": 0.4}),
    ("pair_logistic", {"beta": 0.4}),
    ("pair_hinge", {"beta": 0.4}),
    ("point_mse", {"beta": 0.4}),
    ("point_sigmoid", {"beta": 0.4}),
    ("softmax", {"beta": 0.4}),
    ("bt", {"margin": 0.3}),
    ("bt_pair", {"margin": 0.3}),
]


def registry_name(case: str) -> str:
    """Some cases exercise a second batch form of one loss (cringe pairwise, bt pairwise)."""
    return {"cringe_pair": "cringe", "bt_pair": "bt"}.get(case, case)


def case_id(case: tuple[str, dict]) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in sorted(params.items()))


LISTWISE = {"rrhf", "pro", "lipo", "list_mle", "pair_logistic", "pair_hinge", "point_mse",
            "point_sigmoid", "softmax", "bt"}
BINARY = {"kto", "npo", "dro", "cringe"}


# ---- random batches ----------------------------------------------------------------------------


def _uniform(gen, shape, lo, hi, dtype):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=dtype)


def make_batch(case: str, B: int = 6, *, seed: int = 0, dtype=torch.float64, K: int = 4, T: int = 3,
               V: int = 5, lo: float = -20.0, hi: float = -0.5) -> dict[str, torch.Tensor]:
    """A random batch with every key the loss of ``case`` reads (log-probs in [lo, hi])."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda *shape, a=lo, b=hi: _uniform(gen, shape, a, b, dtype)  # noqa: E731
    ints = lambda *shape, a=1, b=12: torch.randint(a, b, shape, generator=gen)  # noqa: E731
    if case in LISTWISE:
        mask = torch.rand(B, K, generator=gen) < 0.8
        mask[:, 0] = True  # every row keeps at least one response
        batch = {"logps": u(B, K), "ref_logps": u(B, K), "tokens": ints(B, K),
                 "scores": ints(B, K, a=0, b=4).to(dtype) / 3,  # in [0, 1], with ties
                 "mask": mask}
        if case == "bt":
            batch["rewards"] = u(B, K, a=-3.0, b=3.0)
        return batch
    if case in BINARY:
        label = torch.rand(B, generator=gen) < 0.5
        if case == "npo":
            label[:] = False
        batch = {"logps": u(B), "ref_logps": u(B), "tokens": ints(B), "label": label,
                 "kl": u(1, a=-1.0, b=2.0)[0]}
        if case == "dro":
            batch["value"] = u(B, a=-1.0, b=1.0)
            batch["reward"] = torch.where(label, 1.0, -1.0).to(dtype)
        if case == "cringe":
            batch.update(_cringe_tensors(gen, B, T, dtype, prefix=""))
        return batch
    batch = {key: u(B) for key in PAIRWISE_KEYS}
    batch["chosen_tokens"], batch["rejected_tokens"] = ints(B), ints(B)
    if case == "sppo":
        batch["chosen_winrate"], batch["rejected_winrate"] = u(B, a=0.0, b=1.0), u(B, a=0.0, b=1.0)
    if case == "tdpo":
        for side in ("chosen", "rejected"):
            batch[f"{side}_vocab_logps"] = torch.log_softmax(u(B, T, V, a=-4.0, b=4.0), -1)
            batch[f"ref_{side}_vocab_logps"] = torch.log_softmax(u(B, T, V, a=-4.0, b=4.0), -1)
            batch[f"{side}_token_mask"] = torch.rand(B, T, generator=gen) < 0.8
    if case == "cringe_pair":
        batch.update(_cringe_tensors(gen, B, T, dtype, prefix="rejected_"))
    if case == "nn":
        batch["sample_logps"], batch["ref_sample_logps"] = u(B, K), u(B, K)
        batch["sample_mask"] = torch.rand(B, K, generator=gen) < 0.7
    if case == "bt_pair":
        batch = {"chosen_rewards": u(B, a=-3.0, b=3.0), "rejected_rewards": u(B, a=-3.0, b=3.0),
                 "margin": torch.where(torch.rand(B, generator=gen) < 0.5, u(B, a=0.0, b=1.0),
                                       torch.full((B,), float("nan"), dtype=dtype))}
    return batch


def _cringe_tensors(gen, B, T, dtype, prefix):
    return {f"{prefix}topk_logits": _uniform(gen, (B, T, 6), -3.0, 3.0, dtype),
            f"{prefix}token_logits": _uniform(gen, (B, T), -3.0, 3.0, dtype),
            f"{prefix}token_mask": torch.rand(B, T, generator=gen) < 0.8}


# ---- plain-Python references (float64) ----------------------------------------------------------


def ls(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(ls(z))


def softplus(z: float) -> float:
    return -ls(-z)


def lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _rows(batch: dict) -> list[dict]:
    """Per-example dicts of plain Python values (lists for [B,...] tensors)."""
    B = next(v.shape[0] for v in batch.values() if v.dim() > 0)
    rows = []
    for i in range(B):
        row = {}
        for k, v in batch.items():
            row[k] = v.tolist() if v.dim() == 0 else v[i].tolist()
        rows.append(row)
    return rows


def _valid_items(row: dict) -> list[int]:
    return [j for j, m in enumerate(row["mask"]) if m]


def _by_score(row: dict) -> list[int]:
    return sorted(_valid_items(row), key=lambda j: (-row["scores"][j], j))


def _rank_by(values: list[float], items: list[int]) -> dict[int, int]:
    return {j: r + 1 for r, j in enumerate(sorted(items, key=lambda j: (-values[j], j)))}


def reference(case: str, batch: dict, params: dict) -> list[float]:
    """Per-example losses of ``case`` by the formulas of DESIGN.md, in plain Python floats."""
    p = {**loss_spec(registry_name(case)).defaults, **params}
    rows = _rows(batch)
    if case == "beta_dpo":
        return _beta_dpo_reference(rows, p)
    return [_reference_row(case, r, p) for r in rows]


def _reference_row(case: str, r: dict, p: dict) -> float:  # noqa: C901 (one branch per loss)
    if case in LISTWISE:
        return _listwise_row(case, r, p)
    if case in {"kto", "npo", "dro", "cringe"}:
        return _binary_row(case, r, p)
    if case == "bt_pair":
        m = p["margin"] if math.isnan(r["margin"]) else r["margin"]
        return -ls(r["chosen_rewards"] - r["rejected_rewards"] - m)
    c, rj, rc, rr = (r[k] for k in PAIRWISE_KEYS)
    tw, tl = max(r["chosen_tokens"], 1), max(r["rejected_tokens"], 1)
    rw, rl = c - rc, rj - rr
    D = rw - rl
    aw, al = c / tw, rj / tl
    if case == "sft":
        return -aw
    if case == "dpo":
        e, b = p["label_smoothing"], p["beta"]
        return -(1 - e) * ls(b * D) - e * ls(-b * D)
    if case == "ipo":
        return (D - 1 / (2 * p["beta"])) ** 2
    if case == "hinge":
        return max(0.0, 1 - p["beta"] * D)
    if case == "slic":
        return max(0.0, p["delta"] - c + rj) - p["lam"] * aw
    if case == "dpop":
        return -ls(p["beta"] * (D - p["lam"] * max(0.0, rc - c)))
    if case == "rdpo":
        return -ls(p["beta"] * D - p["alpha"] * (r["chosen_tokens"] - r["rejected_tokens"]))
    if case == "simpo":
        return -ls(p["beta"] * (aw - al) - p["gamma"])
    if case == "orpo":
        odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731  (a well below 0 here)
        return -aw - p["lam"] * ls(odds(aw) - odds(al))
    if case == "cpo":
        return -ls(p["beta"] * (c - rj)) - p["alpha"] * aw
    if case == "fdpo":
        g = {"reverse_kl": lambda x: x, "forward_kl": lambda x: -math.exp(-x),
             "js": lambda x: math.log(2) + x - math.log(1 + math.exp(x)),
             "alpha": lambda x: (1 - math.exp(-p["alpha"] * x)) / p["alpha"]}[p["divergence"]]
        return -ls(p["beta"] * g(rw) - p["beta"] * g(rl))
    if case == "gpo":
        z = p["beta"] * D
        return {"logistic": -ls(z), "hinge": max(0.0, 1 - z), "square": (z - 1) ** 2,
                "exponential": math.exp(-z), "truncated_square": max(0.0, 1 - z) ** 2,
                "savage": sigmoid(-z) ** 2}[p["f"]]
    if case == "sppo":
        b = p["beta"]
        return (rw - (r["chosen_winrate"] - 0.5) / b) ** 2 + (rl - (r["rejected_winrate"] - 0.5) / b) ** 2
    if case == "tdpo":
        kl = {}
        for side in ("chosen", "rejected"):
            total = 0.0
            for t, on in enumerate(r[f"{side}_token_mask"]):
                if on:
                    ref_t, pol_t = r[f"ref_{side}_vocab_logps"][t], r[f"{side}_vocab_logps"][t]
                    total += sum(math.exp(q) * (q - s) for q, s in zip(ref_t, pol_t))
            kl[side] = total
        scale = 1.0 if p["variant"] == "tdpo1" else p["alpha"]  # the stop-gradient changes no value
        return -ls(p["beta"] * (D - scale * (kl["rejected"] - kl["chosen"])))
    if case == "cringe_pair":
        contrast = _cringe_contrast(r, "rejected_", p["k"])
        gate = sigmoid((p["b"] - (c - rj)) / p["tau"])
        return gate * (-aw + p["alpha"] * contrast)
    if case == "nn":
        valid = [j for j, m in enumerate(r["sample_mask"]) if m]
        mean_ratio = sum(r["sample_logps"][j] - r["ref_sample_logps"][j] for j in valid) / max(len(valid), 1)
        return -ls(p["gamma"] * mean_ratio - p["alpha"] * rl)
    raise AssertionError(case)


def _cringe_contrast(r: dict, prefix: str, k: int) -> float:
    """Eq. 29's bracket as a mean over the negative tokens (the positive term is a mean too)."""
    total, count = 0.0, 0
    for t, on in enumerate(r[f"{prefix}token_mask"]):
        if not on:
            continue
        count += 1
        topk = r[f"{prefix}topk_logits"][t][:k]
        neg = r[f"{prefix}token_logits"][t]
        z = lse(topk)
        # expectation over s* ~ softmax(top-k) of -log(e^s* / (e^s* + e^neg))
        total += sum(math.exp(s - z) * -math.log(math.exp(s) / (math.exp(s) + math.exp(neg))) for s in topk)
    return total / max(count, 1)


def _binary_row(case: str, r: dict, p: dict) -> float:
    rr = r["logps"] - r["ref_logps"]
    if case == "kto":
        z0 = p["beta"] * max(0.0, r["kl"])
        if r["label"]:
            return p["lambda_d"] * (1 - sigmoid(p["beta"] * rr - z0))
        return p["lambda_u"] * (1 - sigmoid(z0 - p["beta"] * rr))
    if case == "npo":
        return -(2 / p["beta"]) * ls(-p["beta"] * rr)
    if case == "dro":
        return 0.5 * (r["reward"] - r["value"] - p["beta"] * rr) ** 2
    if case == "cringe":
        if r["label"]:
            return -r["logps"] / max(r["tokens"], 1)
        return p["alpha"] * _cringe_contrast(r, "", p["k"])
    raise AssertionError(case)


def _listwise_row(case: str, r: dict, p: dict) -> float:  # noqa: C901
    items = _valid_items(r)
    order = _by_score(r)
    sc = r["scores"]
    pn = {j: r["logps"][j] / max(r["tokens"][j], 1) for j in items}
    s = {j: p.get("beta", 0) * (r["logps"][j] - r["ref_logps"][j]) for j in items}
    pairs = [(i, j) for i in items for j in items if sc[i] > sc[j]]
    best = order[0]
    if case == "rrhf":
        return sum(max(0.0, pn[j] - pn[i]) for i, j in pairs) - pn[best]
    if case == "pro":
        align = 0.0
        for k in range(len(order) - 1):
            pos, rest = order[k], order[k:]
            if p["score_temperature"]:
                logit = {j: pn[j] * (sc[pos] - sc[j]) for j in rest[1:]}
                logit[pos] = pn[pos] * max(sc[pos] - sc[j] for j in rest[1:])
            else:
                logit = {j: pn[j] for j in rest}
            align += lse(list(logit.values())) - logit[pos]
        return -pn[best] + p["alpha"] * align
    if case == "lipo":
        t = _rank_by(s, items)
        total = 0.0
        for i, j in pairs:
            w = abs((2 ** sc[i] - 1) - (2 ** sc[j] - 1)) * abs(1 / math.log2(1 + t[i]) - 1 / math.log2(1 + t[j]))
            total += w * math.log(1 + math.exp(-(s[i] - s[j])))
        return total
    if case == "list_mle":
        return -sum(s[order[k]] - lse([s[j] for j in order[k:]]) for k in range(len(order)))
    if case == "pair_logistic":
        return sum(math.log(1 + math.exp(-(s[i] - s[j]))) for i, j in pairs)
    if case == "pair_hinge":
        return sum(max(0.0, 1 - (s[i] - s[j])) for i, j in pairs)
    if case == "point_mse":
        return sum((s[j] - sc[j]) ** 2 for j in items)
    if case == "point_sigmoid":
        return -sum(sc[j] * math.log(sigmoid(s[j])) + (1 - sc[j]) * math.log(sigmoid(-s[j])) for j in items)
    if case == "softmax":
        total = sum(sc[j] for j in items)
        if total == 0:
            return 0.0
        z = lse([s[j] for j in items])
        return -sum(sc[j] / total * (s[j] - z) for j in items)
    if case == "bt":
        if not pairs:
            return 0.0
        rw = r["rewards"]
        return sum(-ls(rw[i] - rw[j] - p["margin"]) for i, j in pairs) / len(pairs)
    raise AssertionError(case)


def _beta_dpo_reference(rows: list[dict], p: dict) -> list[float]:
    D = [(r["chosen_logps"] - r["ref_chosen_logps"]) - (r["rejected_logps"] - r["ref_rejected_logps"]) for r in rows]
    n = len(D)
    m0 = p["m0"] if p["m0"] is not None else sum(D) / n
    n_keep = max(1, math.ceil(p["keep_ratio"] * n - 1e-9))
    kept = sorted(range(n), key=lambda i: abs(D[i] - m0))[:n_keep]
    beta_b = max((1 + p["alpha"] * (sum(D[i] for i in kept) / n_keep - m0)) * p["beta"], p["beta"] * 1e-3)
    return [(-ls(beta_b * D[i]) * n / n_keep if i in kept else 0.0) for i in range(n)]


def run_case(case: str, batch: dict, params: dict) -> torch.Tensor:
    return compute_loss(registry_name(case), batch, **params)


# ---- (2) float64 references on random inputs ----------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_float64_reference(case, seed):
    name, params = case
    batch = make_batch(name, B=7, seed=seed)
    got = run_case(name, batch, params)
    assert got.shape == (7,) and got.dtype == torch.float64
    want = torch.tensor(reference(name, batch, params), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_every_registered_loss_has_a_case():
    assert {registry_name(n) for n, _ in CASES} == set(LOSSES)


# ---- (1) closed-form values ---------------------------------------------------------------------


def pair_batch(c=0.0, r=0.0, rc=0.0, rr=0.0, tc=1, tr=1, B=3, dtype=torch.float64):
    full = lambda v: torch.full((B,), float(v), dtype=dtype)  # noqa: E731
    return {"chosen_logps": full(c), "rejected_logps": full(r), "ref_chosen_logps": full(rc),
            "ref_rejected_logps": full(rr), "chosen_tokens": torch.full((B,), tc),
            "rejected_tokens": torch.full((B,), tr)}


def list_batch(logps, scores, ref=None, tokens=None, mask=None, dtype=torch.float64):
    t = lambda x: torch.tensor([x], dtype=dtype)  # noqa: E731
    logps = t(logps)
    return {"logps": logps, "ref_logps": torch.zeros_like(logps) if ref is None else t(ref),
            "tokens": torch.ones_like(logps, dtype=torch.long) if tokens is None else torch.tensor([tokens]),
            "scores": t(scores), "mask": torch.ones_like(logps, dtype=torch.bool) if mask is None else torch.tensor([mask])}


def close(x: torch.Tensor, value: float):
    torch.testing.assert_close(x, torch.full_like(x, value), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,params", [
    ("dpo", {}), ("dpo", {"beta": 3.0, "label_smoothing": 0.3}), ("dpop", {}), ("rdpo", {}),
    ("gpo", {"f": "logistic"}), ("beta_dpo", {"keep_ratio": 1.0}), ("nn", {}),
    *[("fdpo", {"divergence": d}) for d in ("reverse_kl", "forward_kl", "js", "alpha")],
])
def test_policy_equal_to_reference_gives_ln2(name, params):
    """At step 1 (policy == reference) every DPO-family loss is exactly ln 2 (TRL's 0.6932 check)."""
    batch = pair_batch(c=-7.0, r=-3.0, rc=-7.0, rr=-3.0, tc=4, tr=4)
    batch["sample_logps"] = batch["ref_sample_logps"] = torch.full((3, 2), -5.0, dtype=torch.float64)
    close(compute_loss(name, batch, **params), LN2)


def test_tdpo_at_reference_is_ln2_and_seq_kl_is_zero():
    batch = pair_batch(c=-2.0, r=-4.0, rc=-2.0, rr=-4.0)
    logits = torch.log_softmax(torch.randn(3, 4, 6, dtype=torch.float64), -1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    for side in ("chosen", "rejected"):
        batch[f"{side}_vocab_logps"] = batch[f"ref_{side}_vocab_logps"] = logits
        batch[f"{side}_token_mask"] = mask
    close(sequential_kl(logits, logits, mask), 0.0)
    for variant in ("tdpo1", "tdpo2"):
        close(compute_loss("tdpo", batch, variant=variant), LN2)
    # precomputed SeqKL: a larger rejected-side KL raises the loss (TDPO restrains the KL of y_l)
    batch2 = {**pair_batch(), "chosen_seq_kl": torch.zeros(3, dtype=torch.float64),
              "rejected_seq_kl": torch.full((3,), 2.0, dtype=torch.float64)}
    close(compute_loss("tdpo", batch2, variant="tdpo1", beta=0.5), softplus(1.0))
    close(compute_loss("tdpo", batch2, variant="tdpo2", beta=0.5, alpha=0.5), softplus(0.5))


def test_pairwise_closed_forms():
    beta = 0.2
    at_ref = pair_batch(c=-5.0, r=-5.0, rc=-5.0, rr=-5.0, tc=5, tr=5)
    close(compute_loss("ipo", at_ref, beta=beta), 1 / (4 * beta**2))
    close(compute_loss("hinge", at_ref, beta=beta), 1.0)
    close(compute_loss("hinge", pair_batch(c=10.0), beta=beta), 0.0)  # beta*D = 2 > 1
    close(compute_loss("sppo", at_ref, beta=beta), 2 * (0.5 / beta) ** 2)
    for f, value in [("hinge", 1.0), ("square", 1.0), ("exponential", 1.0), ("truncated_square", 1.0),
                     ("savage", 0.25), ("logistic", LN2)]:
        close(compute_loss("gpo", at_ref, f=f), value)
    # SLiC: c == r, so the hinge is delta; a_w = -4/2 = -2
    close(compute_loss("slic", pair_batch(c=-4.0, r=-4.0, tc=2), delta=1.0, lam=0.5), 1.0 + 1.0)
    # DPOP: D = 0 but chosen 1 nat below its reference: -ls(-beta*lam)
    close(compute_loss("dpop", pair_batch(c=-1.0, r=-1.0), beta=0.1, lam=5.0), softplus(0.5))
    # R-DPO: chosen 10 tokens longer
    close(compute_loss("rdpo", pair_batch(tc=11, tr=1), alpha=0.01), softplus(0.1))
    # SimPO at equal mean log-probs: -ls(-gamma)
    close(compute_loss("simpo", pair_batch(c=-6.0, r=-3.0, tc=2, tr=1), gamma=0.5), softplus(0.5))
    # ORPO at a_w = a_l = log(1/2): odds 1 each, -a_w + lam*ln2
    half = math.log(0.5)
    close(compute_loss("orpo", pair_batch(c=2 * half, r=half, tc=2), lam=0.1), -half + 0.1 * LN2)
    # CPO at c == r: ln2 - alpha*a_w
    close(compute_loss("cpo", pair_batch(c=-3.0, r=-3.0, tc=3), alpha=1.0), LN2 + 1.0)
    # sft: mean per-token NLL of the chosen response
    close(compute_loss("sft", pair_batch(c=-6.0, tc=3)), 2.0)
    # cDPO: e weighs the flipped label; beta*D = 3
    close(compute_loss("dpo", pair_batch(c=3.0), beta=1.0, label_smoothing=0.25),
          0.75 * softplus(-3.0) + 0.25 * softplus(3.0))


def test_sppo_uses_win_rates():
    batch = {**pair_batch(), "chosen_winrate": torch.full((3,), 0.5, dtype=torch.float64),
             "rejected_winrate": torch.full((3,), 0.5, dtype=torch.float64)}
    close(compute_loss("sppo", batch), 0.0)  # r = 0 is optimal when the win-rate is 1/2


def test_beta_dpo_batch_beta_and_filter():
    batch = pair_batch(c=1.0, B=2)  # D = 1 for both
    # beta_batch = (1 + 0.6*(1 - 0)) * 0.1 = 0.16
    close(compute_loss("beta_dpo", batch, m0=0.0, keep_ratio=1.0), softplus(-0.16))
    # filtering drops the example farthest from M0 and rescales the kept one by B/n_kept
    batch = pair_batch(B=4)
    batch["chosen_logps"] = torch.tensor([0.0, 0.1, -0.1, 50.0], dtype=torch.float64)
    out = compute_loss("beta_dpo", batch, m0=0.0, keep_ratio=0.75)
    assert out[3] == 0 and (out[:3] > 0).all()
    beta_b = (1 + 0.6 * (0.0 - 0.0)) * 0.1
    torch.testing.assert_close(out[0], torch.tensor(LN2 * 4 / 3, dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor(softplus(-beta_b * 0.1) * 4 / 3, dtype=torch.float64))


def test_beta_dpo_state_keeps_running_mean():
    state = BetaDPOState(momentum=0.5)
    first = pair_batch(c=2.0, B=2)  # M = 2
    close(compute_loss("beta_dpo", first, m0=state, keep_ratio=1.0), softplus(-0.2))  # m0 := batch mean
    assert state.m0 == 2.0
    second = pair_batch(c=4.0, B=2)  # M = 4, m0 = 2 -> beta_batch = (1 + 0.6*2)*0.1 = 0.22
    close(compute_loss("beta_dpo", second, m0=state, keep_ratio=1.0), softplus(-0.22 * 4))
    assert state.m0 == pytest.approx(3.0)


def test_kto_closed_form_and_reference_point():
    batch = {"logps": torch.full((4,), -3.0, dtype=torch.float64), "ref_logps": torch.full((4,), -3.0, dtype=torch.float64),
             "tokens": torch.ones(4), "label": torch.tensor([True, False, True, False]),
             "kl": torch.tensor(0.0, dtype=torch.float64)}
    out = compute_loss("kto", batch, lambda_d=2.0, lambda_u=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.25, 1.0, 0.25], dtype=torch.float64))
    batch["kl"] = torch.tensor(-5.0, dtype=torch.float64)  # negative estimate clamps to 0
    torch.testing.assert_close(compute_loss("kto", batch, lambda_d=2.0, lambda_u=0.5), out)
    batch["kl"] = torch.tensor(10.0, dtype=torch.float64)  # z0 = 1: desirable harder, undesirable easier
    out = compute_loss("kto", batch)
    close(out[0::2], sigmoid(1.0))
    close(out[1::2], sigmoid(-1.0))


def test_kto_reference_point_carries_no_gradient():
    batch = make_batch("kto", B=6)
    batch["kl"] = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    batch["logps"] = batch["logps"].clone().requires_grad_(True)
    compute_loss("kto", batch).sum().backward()
    assert batch["logps"].grad.abs().sum() > 0
    assert batch["kl"].grad is None or (batch["kl"].grad == 0).all()


def test_kto_kl_helpers_pair_every_example_with_another():
    for B in (2, 3, 5, 8):
        idx = kto_mismatched_indices(B)
        assert sorted(idx.tolist()) == list(range(B))
        assert (idx != torch.arange(B)).all()  # odd sizes too (TRL #1911)
    with pytest.raises(ValueError, match="at least 2"):
        kto_mismatched_indices(1)
    logps = torch.tensor([-1.0, -2.0, float("nan"), -4.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -3.0, -5.0])
    kl = kto_kl_from_mismatched(logps, ref, valid=torch.tensor([True, True, True, False]))
    assert kl.item() == pytest.approx(0.5) and not kl.requires_grad  # NaN pair ignored, mean of 1 and 0
    assert kto_kl_from_mismatched(logps[:0], ref[:0]).item() == 0.0  # no pairs: 0, not NaN


def test_npo_and_dro_closed_forms():
    neg = {"logps": torch.full((2,), -3.0, dtype=torch.float64), "ref_logps": torch.full((2,), -3.0, dtype=torch.float64),
           "tokens": torch.ones(2), "label": torch.tensor([False, False])}
    close(compute_loss("npo", neg, beta=0.5), (2 / 0.5) * LN2)
    with pytest.raises(ValueError, match="label-True"):
        compute_loss("npo", {**neg, "label": torch.tensor([False, True])})
    close(compute_loss("dro", {**neg, "value": torch.zeros(2, dtype=torch.float64),
                               "reward": torch.ones(2, dtype=torch.float64)}), 0.5)
    # without `reward`, label False means reward -1
    close(compute_loss("dro", {**neg, "value": torch.zeros(2, dtype=torch.float64)}), 0.5)
    close(compute_loss("dro", {**neg, "value": torch.full((2,), -1.0, dtype=torch.float64)}), 0.0)


def test_cringe_closed_forms():
    T = 3
    equal = {"logps": torch.tensor([-6.0, -1.0], dtype=torch.float64), "tokens": torch.tensor([3, 1]),
             "label": torch.tensor([True, False]), "token_logits": torch.zeros(2, T, dtype=torch.float64),
             "topk_logits": torch.zeros(2, T, 5, dtype=torch.float64), "token_mask": torch.ones(2, T, dtype=torch.bool)}
    out = compute_loss("cringe", equal, alpha=0.5)
    # positive: mean NLL 2; negative: each token ties its contrast: -log(1/2) per token, averaged
    # over the T negative tokens (a mean like the positive term's)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.5 * LN2], dtype=torch.float64))
    half = {**equal, "token_mask": torch.tensor([[True] * T, [True] + [False] * (T - 1)])}
    torch.testing.assert_close(compute_loss("cringe", half, alpha=0.5)[1], torch.tensor(0.5 * LN2, dtype=torch.float64))
    pair = {**pair_batch(c=-2.0, r=-2.0, B=2, tc=2), "rejected_token_logits": equal["token_logits"],
            "rejected_topk_logits": equal["topk_logits"], "rejected_token_mask": equal["token_mask"]}
    # gate sigmoid((b - 0)/tau) = 1/2 at b = 0
    close(compute_loss("cringe", pair, alpha=1.0), 0.5 * (1.0 + LN2))
    # the sampled form picks the indexed candidate
    sampled = {**equal, "topk_logits": torch.tensor([[[0.0, 5.0]] * T] * 2, dtype=torch.float64),
               "sampled_index": torch.ones(2, T, dtype=torch.long)}
    close(compute_loss("cringe", sampled, k=2)[1:], softplus(-5.0))
    with pytest.raises(ValueError, match="width"):
        compute_loss("cringe", equal, k=6)


def test_listwise_closed_forms():
    # RRHF: scores [1, 0]; p = [-1, -0.5]: relu(-0.5 + 1) + (-a_best = 1)
    close(compute_loss("rrhf", list_batch([-1.0, -0.5], [1.0, 0.0])), 1.5)
    # list_mle on 2 items: softplus(s2 - s1), s = beta*logps
    close(compute_loss("list_mle", list_batch([-1.0, -3.0], [0.0, 1.0]), beta=1.0), softplus(-1.0 - -3.0))
    close(compute_loss("pair_logistic", list_batch([-1.0, -3.0], [1.0, 0.0]), beta=1.0), softplus(-2.0))
    close(compute_loss("pair_hinge", list_batch([-1.0, -1.5], [1.0, 0.0]), beta=1.0), 0.5)
    close(compute_loss("point_mse", list_batch([-1.0, -2.0], [1.0, 0.0]), beta=1.0), 4.0 + 4.0)
    close(compute_loss("point_sigmoid", list_batch([0.0, 0.0, 0.0], [1.0, 0.0, 0.5])), 3 * LN2)
    close(compute_loss("softmax", list_batch([0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.5])), math.log(4))
    # LiPO-lambda on 2 items at s = 0: |G1 - G2| = 1, |1/log2(2) - 1/log2(3)|, log(1 + e^0)
    close(compute_loss("lipo", list_batch([0.0, 0.0], [1.0, 0.0])), (1 - 1 / math.log2(3)) * LN2)
    # PRO on 2 items: -a_best + alpha * -log softmax([p1, p2])[best]
    close(compute_loss("pro", list_batch([-2.0, -1.0], [1.0, 0.0]), alpha=2.0), 2.0 + 2.0 * softplus(1.0))
    # Bradley-Terry: equal rewards -> ln 2 averaged over the 3 pairs; tied pair left out
    bt = list_batch([0.0] * 3, [2.0, 1.0, 1.0])
    bt["rewards"] = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    close(compute_loss("bt", bt), LN2)
    bt["rewards"] = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    close(compute_loss("bt", bt, margin=1.0), (softplus(-1.0) + softplus(-2.0)) / 2)
    # sft on a listwise batch: NLL of the best response (score ties -> lower index)
    close(compute_loss("sft", list_batch([-4.0, -9.0, -1.0], [1.0, 1.0, 0.0], tokens=[2, 3, 1])), 2.0)


def test_equal_scores_count_in_no_pairwise_sum():
    tied = list_batch([-1.0, -5.0, -2.0], [0.5, 0.5, 0.5])
    for name in ("lipo", "pair_logistic", "pair_hinge"):
        close(compute_loss(name, tied), 0.0)
    close(compute_loss("rrhf", tied), 1.0)  # only the SFT term of the best (index 0) remains
    bt = {**tied, "rewards": torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)}
    close(compute_loss("bt", bt), 0.0)


@pytest.mark.parametrize("name", [n for n in LOSSES if loss_spec(n).kind == "pairwise"
                                  and not loss_spec(n).extra_keys])
def test_half_precision_inputs_are_computed_in_float32(name):
    """bf16 log-probs of -50 are exact to 0.125 at best; the loss must not round further (DPOP's
    lam=50 would turn bf16 arithmetic into errors of several nats)."""
    gen = torch.Generator().manual_seed(0)
    batch = {k: (-torch.rand(16, generator=gen, dtype=torch.float64) * 50).to(torch.bfloat16)
             for k in PAIRWISE_KEYS}
    batch["chosen_tokens"] = torch.randint(1, 40, (16,), generator=gen).to(torch.bfloat16)
    batch["rejected_tokens"] = torch.randint(1, 40, (16,), generator=gen).to(torch.bfloat16)
    loss = compute_loss(name, batch)
    assert loss.dtype == torch.float32
    reference = compute_loss(name, {k: v.double() for k, v in batch.items()})
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-4)


def test_log1mexp_is_accurate_and_finite():
    a = torch.tensor([-1e-20, -1e-8, -0.3, -0.7, -5.0, -50.0, -1e4, 0.0], dtype=torch.float64)
    out = log1mexp(a)
    assert torch.isfinite(out).all()
    for x, y in zip(a.tolist()[1:-1], out.tolist()[1:-1]):
        assert y == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)


# ---- registry contract ---------------------------------------------------------------------------

DESIGN_DEFAULTS = {
    "sft": {}, "dpo": {"beta": 0.1, "label_smoothing": 0.0}, "ipo": {"beta": 0.1}, "hinge": {"beta": 0.1},
    "slic": {"delta": 1.0, "lam": 0.0}, "dpop": {"beta": 0.1, "lam": 50.0},
    "rdpo": {"beta": 0.1, "alpha": 0.01}, "simpo": {"beta": 2.0, "gamma": 0.5}, "orpo": {"lam": 0.1},
    "cpo": {"beta": 0.1, "alpha": 1.0}, "fdpo": {"beta": 0.1, "divergence": "reverse_kl", "alpha": 0.5},
    "gpo": {"beta": 0.1, "f": "logistic"}, "sppo": {"beta": 0.1}, "kto": {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0},
    "npo": {"beta": 0.1}, "dro": {"beta": 1.0}, "rrhf": {}, "pro": {"alpha": 1.0}, "lipo": {"beta": 0.1},
    "list_mle": {"beta": 0.1}, "bt": {"margin": 0.0}, "tdpo": {"beta": 0.1, "alpha": 0.5, "variant": "tdpo2"},
    "beta_dpo": {"beta": 0.1, "alpha": 0.6, "m0": None}, "cringe": {"alpha": 1.0, "k": 5},
}


@pytest.mark.parametrize("name", sorted(DESIGN_DEFAULTS))
def test_defaults_are_design_md_table(name):
    defaults = loss_spec(name).defaults
    for key, value in DESIGN_DEFAULTS[name].items():
        assert defaults[key] == value, (name, key)


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'.*dpo.*list_mle"):
        compute_loss("dpoo", pair_batch())


def test_unknown_parameter_lists_allowed_ones():
    with pytest.raises(ValueError, match=r"no parameter 'betta'.*beta=0\.1, label_smoothing=0\.0"):
        compute_loss("dpo", pair_batch(), betta=0.1)


@pytest.mark.parametrize("name,params", [
    ("dpo", {"beta": 0.0}), ("dpo", {"beta": -1.0}), ("dpo", {"beta": float("nan")}), ("dpo", {"beta": "0.1"}),
    ("dpo", {"label_smoothing": 0.7}), ("fdpo", {"divergence": "kl"}), ("fdpo", {"alpha": 1.0}),
    ("gpo", {"f": "cubic"}), ("tdpo", {"variant": "tdpo3"}), ("kto", {"lambda_d": -1.0}),
    ("cringe", {"k": 0}), ("cringe", {"k": 2.5}), ("cringe", {"tau": 0.0}), ("beta_dpo", {"keep_ratio": 0.0}),
    ("beta_dpo", {"m0": "running"}), ("pro", {"score_temperature": 1}), ("nn", {"K": 0}),
    ("ipo", {"beta": True}),
])
def test_invalid_parameter_values_are_refused(name, params):
    (key,) = params
    with pytest.raises(ValueError, match=f"parameter {key}=.*invalid"):
        compute_loss(name, make_batch(name), **params)


@pytest.mark.parametrize("name,missing", [("dpo", "ref_rejected_logps"), ("simpo", "chosen_tokens"),
                                          ("kto", "kl"), ("lipo", "mask"), ("dro", "value"),
                                          ("tdpo", "chosen_token_mask"), ("nn", "sample_logps")])
def test_missing_batch_key_names_key_and_loss(name, missing):
    batch = make_batch(name)
    del batch[missing]
    with pytest.raises(KeyError) as err:
        compute_loss(name, batch)
    assert isinstance(err.value, MissingBatchKeyError)
    assert f"'{missing}'" in str(err.value) and f"'{name}'" in str(err.value)


def test_pairwise_metrics():
    batch = pair_batch(c=-1.0, r=-4.0, rc=-2.0, rr=-3.0, B=2)  # r_w = 1, r_l = -1
    m = pairwise_metrics(batch, beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(1.0)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["kl/implicit"].item() == pytest.approx(0.0)
    assert m["logps/chosen"].item() == -1.0
    tie = pairwise_metrics(pair_batch(), beta=0.1)
    assert tie["rewards/accuracies"].item() == 0.0  # equal rewards are not a correct ranking
    assert pairwise_metrics(pair_batch(c=-1.0, r=-1.0), 0.1)["kl/implicit"].item() == pytest.approx(1.0)
