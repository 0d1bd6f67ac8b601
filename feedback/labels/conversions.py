"""Conversions between data kinds: listwise -> pairwise, pairwise -> listwise, -> binary, -> sft.

All functions are column operations (PyArrow compute + NumPy over the flattened lists); none
loops over rows in Python. Tables may carry the internal columns ``_row`` (source row number of
the record a row came from) and ``_nrec`` (how many source records were merged into the row);
they are carried to the output so the accounting can say which records were written.

A tie (equal scores, or a pairwise row with ``tie`` true) is never silently lost: a pairwise
output cannot hold one, so tie pairs are counted in ``Stats.tie_pairs`` and records left with
no pair at all are dropped by rule with a reason; listwise and binary outputs keep ties when
``ties="keep"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels.columns import one_array
from alignflow.feedback.labels.errors import LabelsError
from alignflow.schemas.pandas_free import import_pandas

STRATEGIES = ("all-pairs", "best-vs-worst", "best-vs-rest", "adjacent")
INTERNAL = ("_row", "_nrec", "_cid")  # source row, records merged, canonical row id


@dataclass
class Stats:
    """What a conversion did to the rows it was given (record-level drops + pair-level detail)."""

    dropped: Counter = field(default_factory=Counter)  # reason -> source records dropped by rule
    tie_pairs: int = 0  # pairs left out because a pairwise output cannot hold a tie
    identical_pairs: int = 0  # pairs left out because both responses are the same text
    extra: dict = field(default_factory=dict)
    # ``_cid`` (else ``_row``) values of input rows that reached the output, when the output
    # carries no such column per row (pairwise -> listwise merges many rows into one)
    contributed: np.ndarray | None = None

    def merge(self, other: "Stats") -> None:
        self.dropped.update(other.dropped)
        self.tie_pairs += other.tie_pairs
        self.identical_pairs += other.identical_pairs
        for key, value in other.extra.items():
            self.extra[key] = self.extra.get(key, 0) + value if isinstance(value, (int, float)) else value


def _nrec(table: pa.Table) -> np.ndarray:
    if "_nrec" in table.column_names:
        return table.column("_nrec").to_numpy().astype(np.int64)
    return np.ones(table.num_rows, dtype=np.int64)


def _drop_rows(table: pa.Table, mask: np.ndarray, reason: str, stats: Stats) -> pa.Table:
    """Remove rows by rule, counting their source records under ``reason``."""
    if mask.any():
        stats.dropped[reason] += int(_nrec(table)[mask].sum())
        table = table.filter(pa.array(~mask))
    return table


def _carry(table: pa.Table, rows: np.ndarray) -> dict[str, pa.Array]:
    """Internal bookkeeping columns of ``table`` taken at ``rows``."""
    idx = pa.array(rows)
    return {name: table.column(name).take(idx) for name in INTERNAL if name in table.column_names}


def _flat(col) -> pa.Array:
    """The values of a list column, honouring slicing (``list_flatten`` does)."""
    return pc.list_flatten(col)


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def descending_order(scores_flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions into the flat score array, each row's block sorted by score (high first).

    Equal scores keep their input order (stable), so ``best`` is the first of tied best ones.
    Rows of up to 64 responses are sorted as one padded [rows, K_max] matrix (a short sort per
    row, much faster than a global lexsort); longer rows fall back to the lexsort.
    """
    n = len(lengths)
    k_max = int(lengths.max()) if n else 0
    if n == 0 or len(scores_flat) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = _starts(lengths)
    if k_max > 64 or not np.isfinite(scores_flat).all():
        row_of = np.repeat(np.arange(n), lengths)
        return np.lexsort((-scores_flat, row_of))
    row_of = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(scores_flat)) - starts[row_of]
    padded = np.full((n, k_max), np.inf)
    padded[row_of, pos] = -scores_flat
    order2d = np.argsort(padded, axis=1, kind="stable")
    valid = np.arange(k_max)[None, :] < lengths[:, None]
    return (order2d + starts[:, None])[valid]


_PAIR_TABLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _all_pairs_table(k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """``A[K, q], B[K, q]``: the q-th (a, b), a < b, of C(K, 2) sorted positions (row-major)."""
    if k_max not in _PAIR_TABLES:
        c_max = k_max * (k_max - 1) // 2
        a_tab = np.zeros((k_max + 1, max(c_max, 1)), dtype=np.int64)
        b_tab = np.zeros_like(a_tab)
        for k in range(2, k_max + 1):
            a, b = np.triu_indices(k, 1)
            a_tab[k, : len(a)] = a
            b_tab[k, : len(b)] = b
        _PAIR_TABLES[k_max] = (a_tab, b_tab)
    return _PAIR_TABLES[k_max]


def pair_positions(lengths: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows of ``lengths`` responses sorted best-first: (row, a, b) of every pair.

    ``a`` is the better position (smaller), ``b`` the worse one, both 0-based within the row.
    all-pairs gives C(K,2) pairs per row (InstructGPT), best-vs-worst 1, best-vs-rest and
    adjacent K-1.
    """
    k = lengths.astype(np.int64)
    k2 = np.where(k >= 2, k, 0)
    if strategy == "all-pairs":
        per_row = k2 * (k2 - 1) // 2
    elif strategy == "best-vs-worst":
        per_row = (k2 >= 2).astype(np.int64)
    elif strategy in ("best-vs-rest", "adjacent"):
        per_row = np.maximum(k2 - 1, 0)
    else:
        raise LabelsError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    total = int(per_row.sum())
    row = np.repeat(np.arange(len(k), dtype=np.int64), per_row)
    q = np.arange(total, dtype=np.int64) - np.repeat(_starts(per_row), per_row)
    if strategy == "all-pairs":
        a_tab, b_tab = _all_pairs_table(int(k.max()) if len(k) else 2)
        kr = k[row]
        a, b = a_tab[kr, q], b_tab[kr, q]
    elif strategy == "best-vs-worst":
        a, b = np.zeros(total, dtype=np.int64), k[row] - 1
    elif strategy == "best-vs-rest":
        a, b = np.zeros(total, dtype=np.int64), q + 1
    else:
        a, b = q, q + 1
    return row, a, b


def listwise_to_pairwise(table: pa.Table, strategy: str = "all-pairs", source: str = "human") -> tuple[pa.Table, Stats]:
    """Listwise rows (``responses`` [K], ``scores`` [K]) -> pairwise rows, ``margin`` = score gap.

    Pairs with equal scores are left out (a pair cannot hold a tie; counted in
    ``stats.tie_pairs``); a row whose responses all tie yields no pair and its records are
    dropped by rule. Output row order: input row order, then pair order within the row.
    """
    stats = Stats()
    if table.num_rows == 0:
        return _empty_pairwise(table), stats
    responses = one_array(table.column("responses"))
    scores = one_array(table.column("scores"))
    lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_scores = _flat(scores).to_numpy(zero_copy_only=False).astype(np.float64)
    flat_text = _flat(responses)
    order = descending_order(flat_scores, lengths)
    row, a, b = pair_positions(lengths, strategy)
    base = _starts(lengths)[row]
    chosen_pos, rejected_pos = order[base + a], order[base + b]
    margin = flat_scores[chosen_pos] - flat_scores[rejected_pos]
    tie = margin == 0
    stats.tie_pairs = int(tie.sum())
    if stats.tie_pairs:  # filter positions before taking any text (one take per column)
        keep = np.flatnonzero(~tie)
        row, chosen_pos, rejected_pos, margin = row[keep], chosen_pos[keep], rejected_pos[keep], margin[keep]
    chosen = flat_text.take(pa.array(chosen_pos))
    rejected = flat_text.take(pa.array(rejected_pos))
    same = pc.equal(chosen, rejected)
    stats.identical_pairs = int(pc.sum(same).as_py() or 0)
    if stats.identical_pairs:
        keep = np.flatnonzero(~same.to_numpy(zero_copy_only=False))
        row, margin = row[keep], margin[keep]
        chosen, rejected = chosen.take(pa.array(keep)), rejected.take(pa.array(keep))
    produced = np.bincount(row, minlength=table.num_rows) > 0
    if not produced.all():
        nrec = _nrec(table)
        all_tie = ~produced & (lengths >= 2)
        stats.dropped["all responses tie (a pair cannot hold a tie)"] += int(nrec[all_tie].sum())
        stats.dropped["fewer than two responses"] += int(nrec[~produced & (lengths < 2)].sum())
        stats.dropped = +stats.dropped  # drop zero counts
    out = {
        "prompt_id": table.column("prompt_id").take(pa.array(row)),
        "prompt": repeat_rows(table.column("prompt"), row),
        "chosen": chosen,
        "rejected": rejected,
        "margin": pa.array(margin, pa.float64()),
        "source": pa.nulls(len(row), pa.string()) if source is None or not len(row) else pa.repeat(source, len(row)),
    }
    # which input rows reached the output, without a bookkeeping column per pair
    key = "_cid" if "_cid" in table.column_names else "_row"
    if key in table.column_names:
        stats.contributed = table.column(key).to_numpy()[produced]
    return pa.table(out), stats


def repeat_rows(lists, rows: np.ndarray) -> pa.Array:
    """``lists.take(rows)`` for a list column when ``rows`` is non-decreasing (each row repeated).

    Arrow's generic take on nested lists is slow; here the child values are gathered with
    one (sequential) take and the offsets are computed with NumPy.
    """
    lists = one_array(lists)
    if lists.null_count:
        return lists.take(pa.array(rows))
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = _starts(lengths) + (lists.offsets[0].as_py() if len(lists) else 0)
    new_len = lengths[rows]
    child_idx = np.repeat(starts[rows] - np.concatenate([[0], np.cumsum(new_len)[:-1]]), new_len) + np.arange(int(new_len.sum()))
    child = lists.values.take(pa.array(child_idx))
    offsets = pa.array(np.concatenate([[0], np.cumsum(new_len)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, child, type=lists.type)


def _empty_pairwise(table: pa.Table) -> pa.Table:
    from alignflow.schemas.kinds import schema_for

    out = schema_for("pairwise").empty_table()
    for name in INTERNAL:
        if name in table.column_names:
            out = out.append_column(name, pa.array([], pa.int64()))
    return out


# -- pairwise -> listwise ----------------------------------------------------------------------


def bradley_terry(winner: np.ndarray, loser: np.ndarray, weight: np.ndarray, n_items: int,
                  prior: float = 0.1, iterations: int = 50, tol: float = 1e-10,
                  groups: np.ndarray | None = None) -> np.ndarray:
    """Bradley-Terry log-strengths r (maximum a posteriori) by Newton's method, all groups at once.

    P(i beats j) = sigmoid(r_i - r_j) (survey eq. 1). Comparisons are arrays of length M
    (``weight`` 0.5 on each side encodes a kept tie); ``groups[item]`` says which group (prompt)
    an item belongs to, and items of different groups never meet (default: one group). A
    ``prior`` of virtual half-wins and half-losses against an item of strength r = 0 keeps r
    finite when an item never loses (or never wins) and fixes the scale; with ``prior=0`` each
    group is centred on mean r = 0 instead.

    The objective is concave, so Newton converges in a handful of steps where the MM
    algorithm needs hundreds to thousands. Groups are solved in buckets of equal size, each a
    batch of [k, k] systems. Returns r, shape [n_items].
    """
    groups = np.zeros(n_items, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    size = np.bincount(groups) if n_items else np.zeros(0, dtype=np.int64)
    by_group = np.argsort(groups, kind="stable")
    pos = np.empty(n_items, dtype=np.int64)  # an item's place within its group
    pos[by_group] = np.arange(n_items) - np.repeat(_starts(size), size)
    comp_group = groups[winner]
    r = np.zeros(n_items)
    for k in np.unique(size[size > 0]):
        bucket = np.flatnonzero(size == k)
        chunk = max(1, 4_000_000 // (k * k))  # bounds the [G, k, k] Hessians' memory
        for lo in range(0, len(bucket), chunk):
            items, values = _newton_bt(bucket[lo:lo + chunk], k, groups, pos, winner, loser, weight, comp_group,
                                       prior, iterations, tol)
            r[items] = values
    return r


def _newton_bt(group_ids: np.ndarray, k: int, groups: np.ndarray, pos: np.ndarray, winner: np.ndarray,
               loser: np.ndarray, weight: np.ndarray, comp_group: np.ndarray, prior: float,
               iterations: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method for the groups ``group_ids``, all of ``k`` items: (items, their r).

    Objective per group: sum_c w_c log sigmoid(r_win - r_lose) + prior * sum_i [log sigmoid(r_i)
    + log sigmoid(-r_i)]. With q_c = 1 - sigmoid(r_win - r_lose) the gradient adds w_c q_c to
    the winner and subtracts it from the loser; the negative Hessian is the weighted graph
    Laplacian of w_c q_c (1 - q_c) plus the prior's diagonal 2 prior sigmoid (1 - sigmoid).
    """
    G = len(group_ids)
    row_of_group = np.full(int(groups.max()) + 1, -1)
    row_of_group[group_ids] = np.arange(G)
    items = np.flatnonzero(row_of_group[groups] >= 0)
    item_row, item_pos = row_of_group[groups[items]], pos[items]
    sel = np.flatnonzero(row_of_group[comp_group] >= 0)
    row, i, j, w = row_of_group[comp_group[sel]], pos[winner[sel]], pos[loser[sel]], weight[sel]
    at_i, at_j = row * k + i, row * k + j
    at_ii, at_jj, at_ij, at_ji = at_i * k + i, at_j * k + j, at_i * k + j, at_j * k + i
    R = np.zeros((G, k))
    eye = np.eye(k)
    for _ in range(iterations):
        q = 1.0 - _sigmoid(R[row, i] - R[row, j])
        sig = _sigmoid(R)
        grad = (prior * (1.0 - 2.0 * sig)).ravel()
        grad += np.bincount(at_i, w * q, minlength=G * k) - np.bincount(at_j, w * q, minlength=G * k)
        h = w * q * (1.0 - q)
        neg_hess = (np.bincount(at_ii, h, minlength=G * k * k) + np.bincount(at_jj, h, minlength=G * k * k)
                    - np.bincount(at_ij, h, minlength=G * k * k) - np.bincount(at_ji, h, minlength=G * k * k))
        neg_hess = neg_hess.reshape(G, k, k) + eye * (2.0 * prior * sig * (1.0 - sig))[:, :, None]
        if prior == 0:  # the likelihood ignores a shift of a group: pin its mean instead
            neg_hess += 1.0 / k + 1e-12 * eye
        step = np.linalg.solve(neg_hess, grad.reshape(G, k, 1))[:, :, 0]
        biggest = np.abs(step).max(axis=1, keepdims=True)
        R += step * np.minimum(1.0, 5.0 / np.maximum(biggest, 1e-300))  # at most 5 nats per step
        if prior == 0:
            R -= R.mean(axis=1, keepdims=True)
        if biggest.max() < tol:
            break
    return items, R[item_row, item_pos]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def copeland(winner: np.ndarray, loser: np.ndarray, weight: np.ndarray, n_items: int) -> np.ndarray:
    """Copeland score per item: head-to-head majorities won minus lost (each opponent once)."""
    lo, hi = np.minimum(winner, loser), np.maximum(winner, loser)
    sign = np.where(winner == lo, 1.0, -1.0) * weight * 2 * (winner != loser)
    # a tie (weight 0.5 each way) contributes +w and -w: net zero
    key = lo * n_items + hi
    uniq, inv = np.unique(key, return_inverse=True)
    net = np.bincount(inv, weights=sign, minlength=len(uniq))
    a, b = uniq // n_items, uniq % n_items
    score = np.zeros(n_items)
    np.add.at(score, a, np.sign(net))
    np.add.at(score, b, -np.sign(net))
    return score


def cyclic_groups(winner: np.ndarray, loser: np.ndarray, weight: np.ndarray, group_of_item: np.ndarray,
                  n_items: int) -> np.ndarray:
    """Groups (prompts) whose head-to-head majority graph has a directed cycle (intransitive).

    Repeatedly removes items that beat no remaining item (sinks); what cannot be removed lies
    on or above a cycle. Vectorized over all groups; at most ``max items per group`` rounds.
    """
    lo, hi = np.minimum(winner, loser), np.maximum(winner, loser)
    sign = np.where(winner == lo, 1.0, -1.0) * weight * (winner != loser)
    key = lo * n_items + hi
    uniq, inv = np.unique(key, return_inverse=True)
    net = np.bincount(inv, weights=sign, minlength=len(uniq))
    decided = net != 0
    a, b = uniq[decided] // n_items, uniq[decided] % n_items
    src = np.where(net[decided] > 0, a, b)  # majority winner -> loser
    dst = np.where(net[decided] > 0, b, a)
    alive = np.ones(n_items, dtype=bool)
    edge_alive = np.ones(len(src), dtype=bool)
    while True:
        out_deg = np.bincount(src[edge_alive], minlength=n_items)
        sinks = alive & (out_deg == 0)
        if not sinks.any():
            break
        alive &= ~sinks
        edge_alive &= alive[dst]
        if not edge_alive.any():
            break
    return np.unique(group_of_item[src[edge_alive]])


def pairwise_to_listwise(table: pa.Table, ties: str = "drop") -> tuple[pa.Table, Stats]:
    """Group pairs by prompt and order each prompt's responses by a Bradley-Terry fit.

    ``scores`` are the fitted log-strengths (higher is better). Copeland's method is computed
    as a check (``stats.extra['copeland_disagreements']`` counts prompts where the two orders
    differ) and prompts whose head-to-head majorities form a cycle are listed in
    ``stats.extra['intransitive_prompts']``. Tie pairs count half a win each way when
    ``ties="keep"`` and are dropped by rule otherwise.
    """
    pd = import_pandas()

    stats = Stats()
    if "tie" in table.column_names:
        tie = pc.fill_null(table.column("tie"), False).to_numpy(zero_copy_only=False)
        if ties == "drop":
            table = _drop_rows(table, tie, "tie (--ties drop)", stats)
            tie = np.zeros(table.num_rows, dtype=bool)
    else:
        tie = np.zeros(table.num_rows, dtype=bool)
    n = table.num_rows
    if n == 0:
        return _empty_listwise(), stats
    key = "_cid" if "_cid" in table.column_names else "_row"
    if key in table.column_names:
        stats.contributed = table.column(key).to_numpy()
    pid = table.column("prompt_id").to_numpy(zero_copy_only=False)
    chosen = table.column("chosen").to_numpy(zero_copy_only=False)
    rejected = table.column("rejected").to_numpy(zero_copy_only=False)
    group_codes, group_uniques = pd.factorize(pid)
    item_keys = pd.MultiIndex.from_arrays([np.concatenate([group_codes, group_codes]), np.concatenate([chosen, rejected])])
    item_codes, item_uniques = pd.factorize(item_keys)
    n_items = len(item_uniques)
    winner, loser = item_codes[:n], item_codes[n:]
    weight = np.where(tie, 0.5, 1.0)
    # a tie counts half a win each way: add the reversed half-comparison
    w_all = np.concatenate([winner, loser[tie]])
    l_all = np.concatenate([loser, winner[tie]])
    wt_all = np.concatenate([weight, weight[tie]])
    group_of_item = np.asarray(item_uniques.get_level_values(0))
    strength = bradley_terry(w_all, l_all, wt_all, n_items, groups=group_of_item)
    cope = copeland(w_all, l_all, wt_all, n_items)
    text_of_item = np.asarray(item_uniques.get_level_values(1), dtype=object)
    strength = np.round(strength, 6)  # as stored: equal strengths (symmetric cycles) keep first-seen order
    order = np.lexsort((-strength, group_of_item))
    sorted_groups = group_of_item[order]
    counts = np.bincount(group_of_item, minlength=len(group_uniques))
    # Copeland check: does the Copeland score ever rank an item above one BT puts higher?
    cope_sorted = cope[order]
    same_group = sorted_groups[1:] == sorted_groups[:-1]
    inversions = same_group & (cope_sorted[1:] > cope_sorted[:-1])
    stats.extra["copeland_disagreements"] = int(len(np.unique(sorted_groups[1:][inversions])))
    cyc = cyclic_groups(w_all, l_all, wt_all, group_of_item, n_items)
    stats.extra["intransitive_prompts"] = [str(group_uniques[g]) for g in cyc]
    first_row = np.full(len(group_uniques), n, dtype=np.int64)
    np.minimum.at(first_row, group_codes, np.arange(n))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    out = {
        "prompt_id": pa.array(group_uniques.astype(object), pa.string()),
        "prompt": table.column("prompt").take(pa.array(first_row)),
        "responses": pa.ListArray.from_arrays(offsets, pa.array(text_of_item[order], pa.string())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(strength[order], pa.float64())),
        "_row": table.column("_row").take(pa.array(first_row)) if "_row" in table.column_names else pa.array(first_row),
        "_nrec": pa.array(np.bincount(group_codes, weights=_nrec(table), minlength=len(group_uniques)).astype(np.int64)),
    }
    return pa.table(out), stats


def _empty_listwise() -> pa.Table:
    from alignflow.schemas.kinds import schema_for

    t = schema_for("listwise").empty_table()
    return t.append_column("_row", pa.array([], pa.int64())).append_column("_nrec", pa.array([], pa.int64()))


# -- to binary / sft ---------------------------------------------------------------------------


def pairwise_to_binary(table: pa.Table, ties: str = "drop") -> tuple[pa.Table, Stats]:
    """KTO-style unpairing: chosen -> label true, rejected -> label false (2 rows per pair).

    A kept tie gives both responses the same label: true, or false when the tie says both
    are bad (``both_bad``, e.g. arena's "tie (bothbad)").
    """
    stats = Stats()
    tie = pc.fill_null(table.column("tie"), False).to_numpy(zero_copy_only=False) if "tie" in table.column_names \
        else np.zeros(table.num_rows, dtype=bool)
    if ties == "drop" and tie.any():
        table = _drop_rows(table, tie, "tie (--ties drop)", stats)
        tie = tie[~tie]
    both_bad = pc.fill_null(table.column("both_bad"), False).to_numpy(zero_copy_only=False) \
        if "both_bad" in table.column_names else np.zeros(table.num_rows, dtype=bool)
    n = table.num_rows
    rows = np.repeat(np.arange(n), 2)
    label = np.tile([True, False], n)
    tie2, bad2 = np.repeat(tie, 2), np.repeat(both_bad, 2)
    label = np.where(tie2, ~bad2, label)
    response = pc.if_else(pa.array(np.tile([True, False], n)), table.column("chosen").take(pa.array(rows)),
                          table.column("rejected").take(pa.array(rows)))
    out = {
        "prompt_id": table.column("prompt_id").take(pa.array(rows)),
        "prompt": table.column("prompt").take(pa.array(rows)),
        "response": response,
        "label": pa.array(label, pa.bool_()),
    }
    out.update(_carry(table, rows))
    return pa.table(out), stats


def listwise_to_binary(table: pa.Table, threshold: float | None = None, top_k: int = 1,
                       ties: str = "drop") -> tuple[pa.Table, Stats]:
    """Listwise -> binary: by ``threshold`` (score >= threshold is desirable) or top/bottom k.

    Top/bottom k: the k best responses are desirable, the k worst undesirable, the middle is
    left out (counted in ``stats.extra['responses_left_out']``). With ``ties="drop"`` a row
    whose best and worst scores are equal is dropped by rule; with ``ties="keep"`` its
    responses all become desirable.
    """
    stats = Stats()
    responses = one_array(table.column("responses"))
    lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False).astype(np.int64)
    scores = _flat(one_array(table.column("scores"))).to_numpy(zero_copy_only=False).astype(np.float64)
    row_of = np.repeat(np.arange(table.num_rows), lengths)
    if threshold is not None:
        take = np.arange(len(scores))
        label = scores >= threshold
    else:
        order = descending_order(scores, lengths)
        pos = np.arange(len(scores)) - np.repeat(_starts(lengths), lengths)  # position in sorted row
        k_row = lengths[row_of]
        kk = np.minimum(top_k, k_row // 2)
        best = pos < kk
        worst = pos >= k_row - kk
        top = np.maximum.reduceat(scores, _starts(lengths)) if len(scores) else np.zeros(0)
        bottom = np.minimum.reduceat(scores, _starts(lengths)) if len(scores) else np.zeros(0)
        all_tie = (top == bottom)[row_of]
        if ties == "drop":
            dropped_rows = top == bottom
            if dropped_rows.any():
                stats.dropped["all responses tie (--ties drop)"] += int(_nrec(table)[dropped_rows].sum())
            best &= ~all_tie
            worst &= ~all_tie
        else:
            best |= all_tie
            worst &= ~all_tie
        chosen_pos = order[best | worst]
        take = np.sort(chosen_pos)
        label_sorted = np.zeros(len(scores), dtype=bool)
        label_sorted[order[best]] = True
        label = label_sorted[take]
        stats.extra["responses_left_out"] = int(len(scores) - len(take))
    rows = row_of[take]
    out = {
        "prompt_id": table.column("prompt_id").take(pa.array(rows)),
        "prompt": table.column("prompt").take(pa.array(rows)),
        "response": _flat(responses).take(pa.array(take)),
        "label": pa.array(label, pa.bool_()),
    }
    out.update(_carry(table, rows))
    return pa.table(out), stats


def to_sft(table: pa.Table, kind: str) -> tuple[pa.Table, Stats]:
    """The preferred response of each row: chosen (pairwise), best (listwise), label true (binary)."""
    stats = Stats()
    if kind == "pairwise":
        tie = pc.fill_null(table.column("tie"), False).to_numpy(zero_copy_only=False) if "tie" in table.column_names \
            else np.zeros(table.num_rows, dtype=bool)
        table = _drop_rows(table, tie, "tie (no preferred response)", stats)
        response = table.column("chosen")
    elif kind == "binary":
        bad = ~pc.fill_null(table.column("label"), False).to_numpy(zero_copy_only=False)
        table = _drop_rows(table, bad, "label false (not an SFT target)", stats)
        response = table.column("response")
    elif kind == "listwise":
        responses = one_array(table.column("responses"))
        lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False).astype(np.int64)
        scores = _flat(one_array(table.column("scores"))).to_numpy(zero_copy_only=False).astype(np.float64)
        order = descending_order(scores, lengths)
        response = _flat(responses).take(pa.array(order[_starts(lengths)]))
    else:
        raise LabelsError(f"cannot make sft rows from {kind}")
    out = {"prompt_id": table.column("prompt_id"), "prompt": table.column("prompt"), "response": response}
    out.update({n: table.column(n) for n in INTERNAL if n in table.column_names})
    return pa.table(out), stats


def to_prompts(table: pa.Table, kind: str) -> tuple[pa.Table, Stats]:
    """One row per distinct prompt (first appearance order), for generation and online training.

    ``reference`` holds a gold answer where the rows give one: the sft response, the pairwise
    chosen (ties give none), the best listwise response, a binary response labelled true, or a
    prompts row's own ``reference``; the first non-null of a prompt's rows is kept. Rows of the
    same prompt merge into its one row (their records all count as written)."""
    stats = Stats()
    n = table.num_rows
    if kind == "prompts":
        reference = table.column("reference") if "reference" in table.column_names else pa.nulls(n, pa.string())
    elif kind in ("sft", "pairwise", "binary", "listwise"):
        if kind == "sft":
            reference = table.column("response")
        elif kind == "pairwise":
            tie = pc.fill_null(table.column("tie"), False) if "tie" in table.column_names else pa.array(np.zeros(n, bool))
            reference = pc.if_else(tie, pa.scalar(None, pa.string()), table.column("chosen"))
        elif kind == "binary":
            reference = pc.if_else(pc.fill_null(table.column("label"), False), table.column("response"),
                                   pa.scalar(None, pa.string()))
        else:
            responses = table.column("responses").combine_chunks()
            lengths = pc.list_value_length(responses).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            scores = _flat(table.column("scores").combine_chunks()).to_numpy(zero_copy_only=False).astype(np.float64)
            best = descending_order(scores, lengths)[_starts(lengths)] if n else np.zeros(0, np.int64)
            reference = _flat(responses).take(pa.array(best))
            reference = pc.if_else(pc.greater(pa.array(lengths), 0), reference, pa.scalar(None, pa.string()))
    else:
        raise LabelsError(f"cannot make prompts rows from {kind}")
    ids = table.column("prompt_id").combine_chunks() if n else pa.array([], pa.string())
    keyed = pa.table({"prompt_id": ids, "reference": reference.cast(pa.string()), "_i": pa.array(np.arange(n)),
                      "_nrec": pa.array(_nrec(table))})
    # use_threads=False keeps groups in order of first appearance; "first" skips null references
    grouped = keyed.group_by("prompt_id", use_threads=False).aggregate(
        [("_i", "min"), ("reference", "first"), ("_nrec", "sum")])
    first = grouped.column("_i_min")
    out = {"prompt_id": grouped.column("prompt_id"), "prompt": table.column("prompt").take(first),
           "reference": grouped.column("reference_first")}
    out.update({name: table.column(name).take(first) for name in ("_row", "_cid") if name in table.column_names})
    out["_nrec"] = grouped.column("_nrec_sum")
    if "_cid" in table.column_names:  # every row reached the output (merged into its prompt's row)
        stats.contributed = table.column("_cid").to_numpy()
    return pa.table(out), stats


# -- ratings -> listwise -----------------------------------------------------------------------

ASPECT_PREFIX = "aspect:"


def parse_aspect(spec: str | None, available: list[str], default: str | None) -> dict[str, float]:
    """``helpfulness`` | ``mean`` | ``helpfulness=0.7,honesty=0.3`` -> {aspect: weight}."""
    spec = (spec or default or "mean").strip()
    if spec == "mean":
        return {a: 1.0 for a in available}
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in available:
            raise LabelsError(f"unknown aspect {name!r}; this file has: {', '.join(available) or 'none'}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise LabelsError(f"aspect weight {w!r} is not a number (use e.g. helpfulness=0.7,honesty=0.3)") from None
    if not any(weights.values()):
        raise LabelsError(f"aspect weights {spec!r} are all zero")
    return weights


def aspects_of(table: pa.Table) -> list[str]:
    return [c[len(ASPECT_PREFIX):] for c in table.column_names if c.startswith(ASPECT_PREFIX)]


def ratings_to_listwise(table: pa.Table, aspect: str | None = None, default: str | None = None,
                        min_responses: int = 2) -> tuple[pa.Table, Stats]:
    """Per-aspect ratings (columns ``aspect:<name>``, lists aligned with ``responses``) -> scores.

    ``scores`` = sum_a w_a * rating_a / sum_a |w_a| over the chosen aspects: a negative weight
    prefers low ratings (e.g. ``quality=1,toxicity=-1``). A response lacking a used rating (``N/A``)
    is left out of its row (``stats.extra['unrated_responses']``); a row left with fewer than
    ``min_responses`` (2; 1 where each response is labelled on its own) rated responses is
    dropped by rule.
    """
    stats = Stats()
    names = aspects_of(table)
    if not names:
        return table, stats
    if not aspect and default:  # the default aspects this file has (UltraFeedback files may rate only some)
        present = [a for a in default.split(",") if a.partition("=")[0].strip() in names]
        default = ",".join(present) if present else None
    weights = parse_aspect(aspect, names, default)
    responses = one_array(table.column("responses"))
    lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False).astype(np.int64)
    total = np.zeros(int(lengths.sum()))
    known = np.ones(len(total), dtype=bool)
    for name, w in weights.items():  # an overflow to inf is quarantined by the listwise checks
        vals = _flat(one_array(table.column(ASPECT_PREFIX + name))).cast(pa.float64())
        arr = vals.to_numpy(zero_copy_only=False)
        known &= ~np.isnan(arr)
        with np.errstate(over="ignore"):
            total += w * np.where(np.isnan(arr), 0.0, arr)  # NaN: not rated (left out below); inf stays inf
    score = total / sum(abs(w) for w in weights.values())
    row_of = np.repeat(np.arange(table.num_rows), lengths)
    keep = np.flatnonzero(known)
    stats.extra["unrated_responses"] = int(len(total) - len(keep))
    new_len = np.bincount(row_of[keep], minlength=table.num_rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(new_len)]).astype(np.int32))
    out = table.drop_columns([ASPECT_PREFIX + n for n in names] + ["responses"] + (["scores"] if "scores" in table.column_names else []))
    out = out.append_column("responses", pa.ListArray.from_arrays(offsets, _flat(responses).take(pa.array(keep))))
    out = out.append_column("scores", pa.ListArray.from_arrays(offsets, pa.array(score[keep], pa.float64())))
    out = _drop_rows(out, new_len < min_responses, "fewer than two rated responses" if min_responses > 1
                     else "no rated response", stats)
    stats.extra["aspect"] = ",".join(f"{k}={v:g}" for k, v in weights.items())
    return out, stats
