"""Several annotators on one item: aggregate their graded votes and measure how much they agree.

A graded pairwise vote is a number ``g`` in [-G, G]: positive prefers response A, negative B,
0 is a tie, ``|g|`` is the strength (e.g. Tulu's a-is-better = 2, a-is-slightly-better = 1).
Items are keyed by (prompt_id, unordered pair of responses), so the same pair shown as (A, B)
to one annotator and (B, A) to another is one item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from alignflow.schemas.pandas_free import import_pandas

AGGREGATIONS = ("majority", "mean")


@dataclass
class Agreement:
    """Inter-annotator agreement over items with at least two annotators (3-way a / tie / b)."""

    items: int  # items with >= 2 annotators
    annotations: int  # their annotations
    percent: float  # share of annotator pairs on the same item that give the same 3-way label
    krippendorff_alpha: float  # nominal alpha over the 3-way labels (1 = perfect, 0 = chance)

    def as_dict(self) -> dict:
        return {"items": self.items, "annotations": self.annotations,
                "percent_agreement": round(self.percent, 4), "krippendorff_alpha_nominal": round(self.krippendorff_alpha, 4)}

    def summary(self) -> str:
        return (f"inter-annotator agreement on {self.items} items with 2+ annotators ({self.annotations} labels): "
                f"{100 * self.percent:.1f}% pairwise, Krippendorff's alpha {self.krippendorff_alpha:.3f}")


def agreement(item: np.ndarray, label: np.ndarray, n_labels: int = 3) -> Agreement:
    """Agreement of categorical ``label`` (0..n_labels-1) given per annotation ``item`` codes.

    Percent agreement: over ordered pairs of different annotators of one item. Krippendorff's
    alpha (nominal): ``1 - D_o / D_e`` from the coincidence matrix, each item's pairs weighted
    by ``1 / (m_u - 1)``.
    """
    counts = np.zeros((int(item.max()) + 1 if len(item) else 0, n_labels))
    np.add.at(counts, (item, label), 1)
    m = counts.sum(1)
    multi = m >= 2
    counts, m = counts[multi], m[multi]
    if not len(m):
        return Agreement(0, 0, float("nan"), float("nan"))
    same_pairs = (counts * (counts - 1)).sum()
    all_pairs = (m * (m - 1)).sum()
    w = 1.0 / (m - 1)
    coincidence = (counts * w[:, None]).T @ counts - np.diag((counts * w[:, None]).sum(0))
    n = coincidence.sum()
    n_c = coincidence.sum(1)
    observed = (n - np.trace(coincidence)) / n
    expected = (n * n - (n_c ** 2).sum()) / (n * (n - 1))
    alpha = 1.0 - observed / expected if expected > 0 else float("nan")
    return Agreement(int(len(m)), int(m.sum()), float(same_pairs / all_pairs), float(alpha))


def canonical_orientation(a: np.ndarray, b: np.ndarray, grade: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order each pair's texts (A < B) and flip the grade's sign where they were swapped."""
    swap = a > b
    return np.where(swap, b, a), np.where(swap, a, b), np.where(swap, -grade, grade)


def aggregate_graded(prompt_id: np.ndarray, a: np.ndarray, b: np.ndarray, grade: np.ndarray,
                     how: str = "majority") -> dict[str, np.ndarray]:
    """Aggregate graded votes per item -> one row per item.

    majority: the most common of prefer-A / tie / prefer-B (a draw between A and B is a tie);
    strength = mean ``|g|`` of the votes for the winner. mean: the mean grade; its sign decides,
    its absolute value is the strength. Returns arrays: ``first`` (index of the item's first
    annotation), ``grade`` (signed aggregate, 0 = tie), ``annotators``, ``agreement`` (share of
    the item's annotators whose 3-way label equals the aggregate), ``item`` (item code per
    annotation), ``label3`` (per annotation, 0 = B, 1 = tie, 2 = A).
    """
    pd = import_pandas()

    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; known: {', '.join(AGGREGATIONS)}")
    a, b, g = canonical_orientation(a, b, grade.astype(np.float64))
    item, uniques = pd.factorize(pd.MultiIndex.from_arrays([prompt_id, a, b]))
    n_items = len(uniques)
    label3 = (np.sign(g) + 1).astype(np.int64)
    votes = np.zeros((n_items, 3))
    np.add.at(votes, (item, label3), 1)
    annotators = votes.sum(1)
    if how == "mean":
        agg = np.bincount(item, weights=g, minlength=n_items) / annotators
    else:
        top = votes.max(1, keepdims=True)
        n_top = (votes == top).sum(1)
        unique_top = np.argmax(votes, 1)  # 0 = B, 1 = tie, 2 = A; meaningful where n_top == 1
        sign = np.where(n_top == 1, unique_top - 1.0, 0.0)  # a draw between categories is a tie
        agree_with = (np.sign(g) == sign[item]).astype(np.float64)
        strength = np.bincount(item, weights=np.abs(g) * agree_with, minlength=n_items) / np.maximum(
            np.bincount(item, weights=agree_with, minlength=n_items), 1)
        agg = sign * strength
    agg_label = (np.sign(agg) + 1).astype(np.int64)
    agreeing = np.bincount(item, weights=(label3 == agg_label[item]).astype(np.float64), minlength=n_items)
    first = np.full(n_items, len(item), dtype=np.int64)
    np.minimum.at(first, item, np.arange(len(item)))
    return {
        "first": first, "a": np.asarray(uniques.get_level_values(1), dtype=object),
        "b": np.asarray(uniques.get_level_values(2), dtype=object), "grade": agg,
        "annotators": annotators.astype(np.int64), "agreement": agreeing / annotators,
        "item": item, "label3": label3,
    }


def graded_to_pairwise_columns(agg: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """Aggregated items -> chosen / rejected / margin / tie columns (A vs B by the sign)."""
    g = agg["grade"]
    a_wins = g >= 0
    return {
        "chosen": pa.array(np.where(a_wins, agg["a"], agg["b"]), pa.string()),
        "rejected": pa.array(np.where(a_wins, agg["b"], agg["a"]), pa.string()),
        "margin": pa.array(np.abs(g), pa.float64()),
        "tie": pa.array(g == 0),
        "annotators": pa.array(agg["annotators"]),
        "agreement": pa.array(agg["agreement"], pa.float64()),
    }
