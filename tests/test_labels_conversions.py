"""Kind conversions: strategies, Bradley-Terry / Copeland / cycles, binary, ratings, aggregation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alignflow.feedback.labels import conversions as cv
from alignflow.feedback.labels.aggregate import aggregate_graded, agreement
from alignflow.schemas.prompts import to_messages_array


def listwise(rows: list[tuple[str, list[str], list[float]]]) -> pa.Table:
    prompt = to_messages_array(pa.array([r[0] for r in rows]))
    return pa.table({"prompt_id": pa.array([f"p{i}" for i in range(len(rows))]), "prompt": prompt,
                     "responses": pa.array([r[1] for r in rows], pa.list_(pa.string())),
                     "scores": pa.array([r[2] for r in rows], pa.list_(pa.float64())),
                     "_row": pa.array(np.arange(len(rows), dtype=np.int64)),
                     "_nrec": pa.array(np.ones(len(rows), dtype=np.int64))})


ROWS = [("q1", ["a", "b", "c", "d"], [1.0, 4.0, 2.0, 3.0]), ("q2", ["x", "y", "z"], [5.0, 5.0, 1.0])]


@pytest.mark.parametrize("strategy,expected", [
    ("all-pairs", [("b", "d", 1), ("b", "c", 2), ("b", "a", 3), ("d", "c", 1), ("d", "a", 2), ("c", "a", 1),
                   ("x", "z", 4), ("y", "z", 4)]),
    ("best-vs-worst", [("b", "a", 3), ("x", "z", 4)]),
    ("best-vs-rest", [("b", "d", 1), ("b", "c", 2), ("b", "a", 3), ("x", "z", 4)]),
    ("adjacent", [("b", "d", 1), ("d", "c", 1), ("c", "a", 1), ("y", "z", 4)]),
])
def test_listwise_to_pairwise_strategies(strategy, expected):
    out, stats = cv.listwise_to_pairwise(listwise(ROWS), strategy)
    got = list(zip(out.column("chosen").to_pylist(), out.column("rejected").to_pylist(), out.column("margin").to_pylist()))
    assert got == expected
    # q2 has a tie x=y: all-pairs and best-vs-rest / adjacent leave it out and count it
    assert stats.tie_pairs == {"all-pairs": 1, "best-vs-worst": 0, "best-vs-rest": 1, "adjacent": 1}[strategy]
    assert out.column("prompt").to_pylist()[0] == [{"role": "user", "content": "q1"}]
    assert set(stats.contributed.tolist()) == {0, 1}


def test_all_tied_row_is_dropped_by_rule():
    out, stats = cv.listwise_to_pairwise(listwise([("q", ["a", "b"], [2.0, 2.0]), ("r", ["c", "d"], [1.0, 0.0])]))
    assert out.num_rows == 1 and stats.tie_pairs == 1
    assert stats.dropped == {"all responses tie (a pair cannot hold a tie)": 1}


def test_pair_counts_match_c_k_2():
    rng = np.random.default_rng(0)
    ks = rng.integers(2, 12, 200)
    rows = [(f"q{i}", [f"r{i}-{j}" for j in range(k)], list(rng.permutation(k).astype(float))) for i, k in enumerate(ks)]
    out, stats = cv.listwise_to_pairwise(listwise(rows))
    assert out.num_rows == int((ks * (ks - 1) // 2).sum()) and stats.tie_pairs == 0
    assert (np.array(out.column("margin").to_pylist()) > 0).all()


def test_descending_order_matches_lexsort_including_long_rows():
    rng = np.random.default_rng(1)
    for k_max in (9, 100):
        lengths = rng.integers(1, k_max, 40)
        scores = np.round(rng.uniform(0, 3, lengths.sum()))
        ref = np.lexsort((-scores, np.repeat(np.arange(40), lengths)))
        assert (cv.descending_order(scores, lengths) == ref).all()


def pairs_table(pairs, ties=None):
    n = len(pairs)
    prompt = to_messages_array(pa.array([p[0] for p in pairs]))
    cols = {"prompt_id": pa.array([p[0] for p in pairs]), "prompt": prompt,
            "chosen": pa.array([p[1] for p in pairs]), "rejected": pa.array([p[2] for p in pairs]),
            "margin": pa.nulls(n, pa.float64()), "source": pa.array(["human"] * n),
            "_row": pa.array(np.arange(n, dtype=np.int64)), "_nrec": pa.array(np.ones(n, dtype=np.int64))}
    if ties is not None:
        cols["tie"] = pa.array(ties)
    return pa.table(cols)


def test_pairwise_to_listwise_bradley_terry_order_and_cycles():
    pairs = [("q", "a", "b"), ("q", "a", "b"), ("q", "b", "c"), ("q", "a", "c"),  # a > b > c
             ("r", "x", "y"), ("r", "y", "z"), ("r", "z", "x")]  # a cycle
    out, stats = cv.pairwise_to_listwise(pairs_table(pairs))
    rows = {r["prompt_id"]: r for r in out.to_pylist()}
    assert rows["q"]["responses"] == ["a", "b", "c"]
    s = rows["q"]["scores"]
    assert s[0] > s[1] > s[2]
    assert stats.extra["intransitive_prompts"] == ["r"]
    assert stats.extra["copeland_disagreements"] == 0
    assert rows["r"]["_nrec"] == 3 and rows["q"]["_nrec"] == 4
    # a symmetric cycle gives (almost) equal strengths
    assert max(rows["r"]["scores"]) - min(rows["r"]["scores"]) < 1e-6


def test_bradley_terry_recovers_win_probabilities():
    # 3 wins of a over b, 1 of b over a: p_a / (p_a + p_b) ~= 0.75 (small prior pulls to 0.5)
    w = np.array([0, 0, 0, 1]); l_ = np.array([1, 1, 1, 0])
    s = cv.bradley_terry(w, l_, np.ones(4), 2, prior=0.0)
    assert 1 / (1 + np.exp(s[1] - s[0])) == pytest.approx(0.75, abs=1e-6)


def test_bradley_terry_equals_an_independent_map_fit():
    """Groups of 2..7 items with random comparisons and kept ties (half a win each way): the
    batched Newton fit equals a per-group quasi-Newton maximisation of the same posterior."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(5)
    sizes = rng.integers(2, 8, 40)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    winner, loser, weight = [], [], []
    for g, (k, s0) in enumerate(zip(sizes, starts)):
        for _ in range(int(rng.integers(1, 3 * k))):
            a, b = rng.choice(k, 2, replace=False) + s0
            if rng.random() < 0.2:  # a kept tie
                winner += [a, b]; loser += [b, a]; weight += [0.5, 0.5]
            else:
                winner.append(a); loser.append(b); weight.append(1.0)
    winner, loser, weight = np.array(winner), np.array(loser), np.array(weight)
    r = cv.bradley_terry(winner, loser, weight, len(groups), prior=0.1, groups=groups)

    def neg_log_posterior(x, w_, l_, wt):
        d = x[w_] - x[l_]
        value = (wt * np.logaddexp(0, -d)).sum() + 0.1 * (np.logaddexp(0, -x) + np.logaddexp(0, x)).sum()
        q = wt / (1 + np.exp(d))  # d/dd of wt*log(1+exp(-d)) is -q
        grad = -np.bincount(w_, q, len(x)) + np.bincount(l_, q, len(x)) + 0.1 * np.tanh(x / 2)
        return value, grad

    for g, (k, s0) in enumerate(zip(sizes, starts)):
        m = groups[winner] == g
        ref = minimize(neg_log_posterior, np.zeros(k), args=(winner[m] - s0, loser[m] - s0, weight[m]), jac=True,
                       method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000}).x
        np.testing.assert_allclose(r[s0:s0 + k], ref, atol=1e-5)


def test_ties_keep_and_drop_in_pairwise_to_listwise():
    pairs = [("q", "a", "b"), ("q", "c", "d")]
    dropped, st = cv.pairwise_to_listwise(pairs_table(pairs, ties=[False, True]), ties="drop")
    assert dropped.column("responses").to_pylist() == [["a", "b"]] and st.dropped == {"tie (--ties drop)": 1}
    kept, _ = cv.pairwise_to_listwise(pairs_table(pairs, ties=[False, True]), ties="keep")
    r = kept.to_pylist()[0]
    scores = dict(zip(r["responses"], r["scores"]))
    assert scores["c"] == pytest.approx(scores["d"]) and scores["a"] > scores["b"]


def test_pairwise_to_binary_unpairs_and_keeps_ties():
    t = pairs_table([("q", "a", "b"), ("q", "c", "d")], ties=[False, True])
    t = t.append_column("both_bad", pa.array([False, True]))
    out, _ = cv.pairwise_to_binary(t, ties="keep")
    assert list(zip(out.column("response").to_pylist(), out.column("label").to_pylist())) == [
        ("a", True), ("b", False), ("c", False), ("d", False)]
    out, st = cv.pairwise_to_binary(t, ties="drop")
    assert out.num_rows == 2 and st.dropped == {"tie (--ties drop)": 1}


def test_listwise_to_binary_top_k_and_threshold():
    t = listwise([("q", ["a", "b", "c", "d", "e"], [5, 4, 3, 2, 1]), ("r", ["x", "y"], [1, 1])])
    out, st = cv.listwise_to_binary(t, top_k=2)
    assert list(zip(out.column("response").to_pylist(), out.column("label").to_pylist())) == [
        ("a", True), ("b", True), ("d", False), ("e", False)]
    assert st.dropped == {"all responses tie (--ties drop)": 1} and st.extra["responses_left_out"] == 3
    out, _ = cv.listwise_to_binary(t, threshold=3.0)
    assert out.column("label").to_pylist() == [True, True, True, False, False, False, False]
    out, _ = cv.listwise_to_binary(t, ties="keep")
    assert out.column("response").to_pylist()[-2:] == ["x", "y"] and out.column("label").to_pylist()[-2:] == [True, True]


def test_ratings_to_listwise_aspect_mix_and_na():
    t = listwise([("q", ["a", "b", "c"], [0, 0, 0])]).drop_columns(["scores"])
    t = t.append_column("aspect:help", pa.array([[5.0, 1.0, None]], pa.list_(pa.float64())))
    t = t.append_column("aspect:honest", pa.array([[1.0, 5.0, 3.0]], pa.list_(pa.float64())))
    out, st = cv.ratings_to_listwise(t, "help")
    assert out.column("responses").to_pylist() == [["a", "b"]] and out.column("scores").to_pylist() == [[5.0, 1.0]]
    assert st.extra["unrated_responses"] == 1
    out, _ = cv.ratings_to_listwise(t, "help=1,honest=3")
    assert out.column("scores").to_pylist() == [[2.0, 4.0]]
    # a negative weight prefers low ratings: normalised by sum |w|, never divided by zero
    out, _ = cv.ratings_to_listwise(t, "help=1,honest=-1")
    assert out.column("scores").to_pylist() == [[2.0, -2.0]]
    out, _ = cv.ratings_to_listwise(t, "honest=-1")
    assert out.column("scores").to_pylist() == [[-1.0, -5.0, -3.0]]
    with pytest.raises(ValueError, match="all zero"):
        cv.ratings_to_listwise(t, "help=0")
    with pytest.raises(ValueError, match="unknown aspect"):
        cv.ratings_to_listwise(t, "nope")


def test_aggregate_majority_mean_and_orientation():
    # item (A, B) seen by three annotators, once shown swapped
    pid = np.array(["p", "p", "p"])
    a = np.array(["A", "B", "A"], dtype=object)
    b = np.array(["B", "A", "B"], dtype=object)
    g = np.array([2.0, -1.0, 0.0])  # A better, A slightly better (swapped), tie
    maj = aggregate_graded(pid, a, b, g, "majority")
    assert maj["grade"].tolist() == [1.5] and maj["annotators"].tolist() == [3]
    assert maj["agreement"][0] == pytest.approx(2 / 3)
    mean = aggregate_graded(pid, a, b, g, "mean")
    assert mean["grade"][0] == pytest.approx(1.0)


def test_agreement_perfect_and_chance():
    item = np.array([0, 0, 1, 1, 2, 2])
    perfect = agreement(item, np.array([0, 0, 2, 2, 1, 1]))
    assert perfect.percent == 1.0 and perfect.krippendorff_alpha == pytest.approx(1.0)
    split = agreement(item, np.array([0, 2, 2, 0, 1, 0]))
    assert split.percent == 0.0 and split.krippendorff_alpha < 0


def test_any_kind_to_prompts_one_row_per_prompt_with_a_reference(tmp_path):
    """convert --to prompts: one row per prompt in first-appearance order, reference = the first
    preferred answer a prompt's rows give (ties give none); every record counts as written."""
    import json

    from alignflow.feedback.labels import Options, convert_labels_file
    from alignflow.schemas.store import read_dataset

    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b", "tie": True},
            {"prompt": "q2", "chosen": "c", "rejected": "d"},
            {"prompt": "q1", "chosen": "e", "rejected": "f"},
            {"prompt": "q3", "chosen": "g", "rejected": "h", "tie": True}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = convert_labels_file(src, tmp_path / "p", "pairwise", "prompts", Options(ties="keep"))
    assert report.read == report.written == 4 and report.rows_out == 3
    out = read_dataset(tmp_path / "p").to_pylist()
    assert [(r["prompt"][0]["content"], r["reference"]) for r in out] == [("q1", "e"), ("q2", "c"), ("q3", None)]
    listwise = pa.table({"prompt_id": ["x", "y"], "prompt": to_messages_array(pa.array(["x", "y"])),
                         "responses": [["lo", "hi", "mid"], ["only", "two"]], "scores": [[0.1, 0.9, 0.5], [1.0, 1.0]]})
    table, _ = cv.to_prompts(listwise, "listwise")
    assert table.column("reference").to_pylist() == ["hi", "only"]
