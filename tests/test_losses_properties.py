"""trainers.losses: gradient direction, batch-order / padding invariance, finiteness at extremes.

Batches come from ``make_batch`` in tests/test_losses.py (every key each loss reads).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignflow.trainers.losses import compute_loss
from tests.test_losses import CASES, LISTWISE, case_id, make_batch, registry_name, run_case

PAIRWISE_CASES = [c for c in CASES if c[0] not in LISTWISE | {"kto", "npo", "dro", "cringe", "bt_pair", "nn"}]
LISTWISE_CASES = [c for c in CASES if c[0] in LISTWISE]


def _with_grad(batch: dict, keys) -> dict:
    out = dict(batch)
    for k in keys:
        out[k] = batch[k].detach().clone().requires_grad_(True)
    return out


def _grads(case, batch, params, keys):
    batch = _with_grad(batch, keys)
    run_case(case, batch, params).sum().backward()
    # a tensor the loss does not read gets no .grad at all: report it as a zero gradient
    return {k: torch.zeros_like(batch[k]) if batch[k].grad is None else batch[k].grad for k in keys}


def _near_reference(batch: dict, seed: int = 0) -> dict:
    """Policy log-probs within 0.05 of the reference (the regime at the start of training)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for key in list(batch):
        ref_key = "ref_" + key
        if ref_key in batch and batch[key].is_floating_point() and batch[key].shape == batch[ref_key].shape:
            noise = 0.05 * (torch.rand(batch[key].shape, generator=gen, dtype=batch[key].dtype) - 0.5)
            out[key] = batch[ref_key] + noise
    return out


# ---- (3) gradient direction ---------------------------------------------------------------------


@pytest.mark.parametrize("case", PAIRWISE_CASES, ids=case_id)
def test_raising_chosen_lowers_and_raising_rejected_raises_the_loss(case):
    name, params = case
    params = {**params, "keep_ratio": 1.0} if name == "beta_dpo" else params  # filtered rows have no gradient
    batch = _near_reference(make_batch(name, B=8))
    batch.pop("chosen_winrate", None), batch.pop("rejected_winrate", None)  # SPPO: hard labels 1 / 0
    if name == "slic":  # keep the hinge active: summed log-probs within delta of each other
        batch["rejected_logps"] = batch["chosen_logps"] - 0.1
    g = _grads(name, batch, params, ["chosen_logps", "rejected_logps"])
    assert (g["chosen_logps"] < 0).all(), g["chosen_logps"]
    if name == "sft":
        assert (g["rejected_logps"] == 0).all()
    else:
        assert (g["rejected_logps"] > 0).all(), g["rejected_logps"]


def test_nn_pushes_samples_up_and_the_negative_down():
    batch = _near_reference(make_batch("nn", B=8))
    batch["sample_mask"][:, 0] = True
    g = _grads("nn", batch, {}, ["sample_logps", "rejected_logps"])
    assert (g["rejected_logps"] > 0).all()
    valid = batch["sample_mask"]
    assert (g["sample_logps"][valid] < 0).all() and (g["sample_logps"][~valid] == 0).all()


def test_tdpo_kl_gradients():
    """tdpo1 pushes the chosen SeqKL up and the rejected down; tdpo2 stops the chosen side."""
    batch = make_batch("tdpo", B=4)
    batch = {k: v for k, v in batch.items() if "vocab" not in k and "token_mask" not in k}
    batch["chosen_seq_kl"], batch["rejected_seq_kl"] = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    g1 = _grads("tdpo", batch, {"variant": "tdpo1"}, ["chosen_seq_kl", "rejected_seq_kl"])
    assert (g1["chosen_seq_kl"] < 0).all() and (g1["rejected_seq_kl"] > 0).all()
    g2 = _grads("tdpo", batch, {"variant": "tdpo2"}, ["chosen_seq_kl", "rejected_seq_kl"])
    assert (g2["chosen_seq_kl"] == 0).all() and (g2["rejected_seq_kl"] > 0).all()
    # from the vocabulary tensors: the gradient reaches the policy's rejected-side log-probs
    full = make_batch("tdpo", B=4)
    g = _grads("tdpo", full, {"variant": "tdpo2"}, ["chosen_vocab_logps", "rejected_vocab_logps"])
    assert (g["chosen_vocab_logps"] == 0).all() and g["rejected_vocab_logps"].abs().sum() > 0


@pytest.mark.parametrize("name", ["kto", "dro", "cringe"])
def test_binary_desirable_up_undesirable_down(name):
    batch = _near_reference(make_batch(name, B=10))
    batch["label"] = torch.tensor([True, False] * 5)
    if name == "dro":
        batch["value"] = torch.zeros(10, dtype=torch.float64)
        batch["reward"] = torch.where(batch["label"], 1.0, -1.0).to(torch.float64)
    g = _grads(name, batch, {}, ["logps"])["logps"]
    assert (g[batch["label"]] < 0).all()
    if name == "cringe":
        assert (g[~batch["label"]] == 0).all()  # negatives act through their token logits
        tg = _grads(name, batch, {}, ["token_logits", "topk_logits"])
        on = batch["token_mask"] & ~batch["label"].unsqueeze(-1)
        assert (tg["token_logits"][on] > 0).all() and (tg["topk_logits"][on][:, :5] < 0).all()  # k = 5 of 6
        assert (tg["token_logits"][~on] == 0).all()
    else:
        assert (g[~batch["label"]] > 0).all()


def test_npo_lowers_the_negative():
    g = _grads("npo", make_batch("npo"), {}, ["logps"])["logps"]
    assert (g > 0).all()


def _listwise_direction_batch(name: str, dtype=torch.float64) -> dict:
    """3 prompts, 4 responses with distinct scores in shuffled columns, plus one padding column."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.stack([torch.tensor([1.0, 0.75, 0.5, 0.25])[torch.randperm(4, generator=gen)] for _ in range(3)])
    scores = torch.cat([scores, torch.zeros(3, 1)], 1).to(dtype)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, -1] = False
    ref = -1 - 10 * torch.rand(3, 5, generator=gen, dtype=dtype)
    batch = {"logps": ref + 0.01 * torch.rand(3, 5, generator=gen, dtype=dtype), "ref_logps": ref,
             "tokens": torch.randint(1, 10, (3, 5), generator=gen), "scores": scores, "mask": mask}
    if name == "bt":
        batch["rewards"] = 0.01 * torch.rand(3, 5, generator=gen, dtype=dtype)
    return batch


WORST_RISES = {"list_mle", "lipo", "pair_logistic", "pair_hinge", "pro", "point_sigmoid", "softmax", "bt"}


@pytest.mark.parametrize("case", LISTWISE_CASES, ids=case_id)
def test_listwise_raising_the_best_lowers_the_loss(case):
    name, params = case
    batch = _listwise_direction_batch(name)
    key = "rewards" if name == "bt" else "logps"
    g = _grads(name, batch, params, [key])[key]
    rows = torch.arange(3)
    best = batch["scores"].argmax(-1)
    worst = torch.where(batch["mask"], batch["scores"], torch.full_like(batch["scores"], 9.0)).argmin(-1)
    assert (g[rows, best] < 0).all(), g
    if name in WORST_RISES:
        assert (g[rows, worst] > 0).all(), g
    assert (g[:, -1] == 0).all()  # padding gets no gradient


# ---- (4) invariance to batch order, padding and column order ---------------------------------------


def _permute_rows(batch: dict, perm: torch.Tensor) -> dict:
    return {k: (v[perm] if v.dim() > 0 else v) for k, v in batch.items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_permuting_rows_permutes_the_losses(case):
    name, params = case
    batch = make_batch(name, B=9, seed=5)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    out = run_case(name, batch, params)
    torch.testing.assert_close(run_case(name, _permute_rows(batch, perm), params), out[perm])


GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 7.0]


def _pad_columns(batch: dict, extra: int, mask_key: str = "mask", gen=None) -> dict:
    """Append ``extra`` masked-out columns holding garbage to every [B,K] tensor."""
    gen = gen or torch.Generator().manual_seed(0)
    mask = batch[mask_key]
    B = mask.shape[0]
    out = {}
    for k, v in batch.items():
        if v.dim() >= 2 and v.shape[:2] == mask.shape:
            if k == mask_key:
                pad = torch.zeros(B, extra, dtype=torch.bool)
            elif v.is_floating_point():
                pad = torch.tensor(GARBAGE, dtype=v.dtype)[torch.randint(len(GARBAGE), (B, extra), generator=gen)]
            else:
                pad = torch.randint(0, 5, (B, extra), generator=gen).to(v.dtype)
            out[k] = torch.cat([v, pad], 1)
        else:
            out[k] = v
    return out


PADDED_CASES = LISTWISE_CASES + [("sft_list", {}), ("nn", {})]


@pytest.mark.parametrize("case", PADDED_CASES, ids=case_id)
def test_padding_columns_count_nowhere(case):
    name, params = case
    real_name = "sft" if name == "sft_list" else name
    base = make_batch("rrhf" if name == "sft_list" else name, B=5, seed=2)
    mask_key = "sample_mask" if name == "nn" else "mask"
    float_keys = [k for k, v in base.items() if v.dim() == 2 and v.is_floating_point() and k != "scores"]
    padded = _pad_columns(base, 3, mask_key)
    a = _with_grad(base, float_keys)
    b = _with_grad(padded, float_keys)
    out_a, out_b = compute_loss(real_name, a, **params), compute_loss(real_name, b, **params)
    torch.testing.assert_close(out_b, out_a)
    out_a.sum().backward()
    out_b.sum().backward()
    for k in float_keys:
        if a[k].grad is None:  # a key this loss does not read
            assert b[k].grad is None
            continue
        K = base[k].shape[1]
        torch.testing.assert_close(b[k].grad[:, :K], a[k].grad)
        assert (b[k].grad[:, K:] == 0).all(), k


@pytest.mark.parametrize("case", LISTWISE_CASES, ids=case_id)
def test_column_order_does_not_matter_without_ties(case):
    name, params = case
    batch = _listwise_direction_batch(name)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(4))
    shuffled = {k: v[:, perm] for k, v in batch.items()}
    torch.testing.assert_close(run_case(name, shuffled, params), run_case(name, batch, params))


@pytest.mark.parametrize("name", ["tdpo", "cringe_pair", "cringe"])
def test_masked_token_positions_count_nowhere(name):
    base = make_batch(name, B=4, seed=3)
    gen = torch.Generator().manual_seed(9)
    noisy = dict(base)
    for k, v in base.items():
        if v.is_floating_point() and v.dim() >= 2:
            mask = base[[m for m in base if m.endswith("token_mask") and m.split("token_mask")[0] in k][0]]
            garbage = torch.tensor(GARBAGE, dtype=v.dtype)[torch.randint(len(GARBAGE), v.shape, generator=gen)]
            m = mask.reshape(mask.shape + (1,) * (v.dim() - 2))
            noisy[k] = torch.where(m, v, garbage)
    keys = [k for k, v in base.items() if v.is_floating_point() and v.dim() >= 2]
    a, b = _with_grad(base, keys), _with_grad(noisy, keys)
    out_a, out_b = run_case(name, a, {}), run_case(name, b, {})
    torch.testing.assert_close(out_b, out_a)
    out_a.sum().backward()
    out_b.sum().backward()
    for k in keys:
        if a[k].grad is None:
            continue
        assert torch.isfinite(b[k].grad).all(), k
        torch.testing.assert_close(b[k].grad, a[k].grad)


# ---- (5) finite values and gradients at extremes ------------------------------------------------

EXTREMES = [-1e4, -1e3, -30.0, -1.0, -1e-6, 0.0]


def extreme_batch(case: str, dtype, seed: int = 0, B: int = 48) -> dict:
    """A batch whose log-probs (and logits, rewards, values) sit at the edges of [-1e4, 0]; the
    first rows cover every corner of the pairwise summaries in {-1e4, 0}."""
    batch = make_batch(case, B=B, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    ext = torch.tensor(EXTREMES, dtype=dtype)
    out = {}
    for k, v in batch.items():
        if "vocab_logps" in k:
            logits = ext[torch.randint(len(EXTREMES), v.shape, generator=gen)]
            out[k] = torch.log_softmax(logits, -1)  # real distributions with near-0 and huge-negative entries
        elif "logps" in k:
            out[k] = ext[torch.randint(len(EXTREMES), v.shape, generator=gen)]
        elif k.endswith("logits") or k in ("rewards", "chosen_rewards", "rejected_rewards", "value", "reward"):
            out[k] = torch.tensor([-1e4, 1e4, 0.0], dtype=dtype)[torch.randint(3, v.shape, generator=gen)]
        elif k.endswith("tokens") or k == "tokens":
            out[k] = torch.tensor([0, 1, 4096])[torch.randint(3, v.shape, generator=gen)]
        else:
            out[k] = v
    if "chosen_logps" in out and out["chosen_logps"].shape[0] >= 16:
        corners = torch.tensor(list(itertools.product([-1e4, 0.0], repeat=4)), dtype=dtype)
        for j, k in enumerate(("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")):
            out[k] = out[k].clone()
            out[k][:16] = corners[:, j]
    if "kl" in out:
        out["kl"] = torch.tensor(1e4 if seed % 2 else 0.0, dtype=dtype)
    return out


def assert_finite_value_and_grad(case: str, batch: dict, params: dict):
    keys = [k for k, v in batch.items() if v.is_floating_point() and v.dim() > 0 and k not in ("scores", "margin")]
    batch = _with_grad(batch, keys)
    out = run_case(case, batch, params)
    assert torch.isfinite(out).all(), (case, out)
    out.sum().backward()
    for k in keys:
        assert batch[k].grad is None or torch.isfinite(batch[k].grad).all(), (case, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_finite_at_extremes(case, dtype):
    name, params = case
    for seed in (0, 1):
        assert_finite_value_and_grad(name, extreme_batch(name, dtype, seed), params)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_agrees_with_float64(case):
    name, params = case
    batch = make_batch(name, seed=7)
    f64 = run_case(name, batch, params)
    f32 = run_case(name, {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}, params)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f64, rtol=1e-4, atol=1e-4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 10_000), B=st.integers(1, 6),
       scale=st.sampled_from([1.0, 30.0, 1e3, 1e4]))
def test_fuzz_finite_anywhere_in_range(case, dtype, seed, B, scale):
    """Random log-probs anywhere in [-scale, 0], batch sizes from 1: finite values and gradients."""
    name, params = case
    if name == "beta_dpo" and B == 1:
        params = {**params, "keep_ratio": 1.0}
    batch = make_batch(name, B=B, seed=seed, dtype=dtype, lo=-scale, hi=0.0)
    out = run_case(name, batch, params)
    assert out.shape == (B,)
    assert_finite_value_and_grad(name, batch, params)


def test_registry_names_match_cases():
    assert sorted({registry_name(n) for n, _ in CASES}) == sorted(
        ["sft", "dpo", "ipo", "hinge", "slic", "dpop", "rdpo", "simpo", "orpo", "cpo", "fdpo", "gpo", "sppo",
         "beta_dpo", "tdpo", "kto", "npo", "dro", "cringe", "nn", "rrhf", "pro", "lipo", "list_mle",
         "pair_logistic", "pair_hinge", "point_mse", "point_sigmoid", "softmax", "bt"])
