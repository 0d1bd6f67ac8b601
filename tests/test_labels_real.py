"""The four real label files in shared/data/human-labels, with exact counts (README.txt there)."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from alignflow.feedback.labels import convert_labels_file
from alignflow.schemas.store import read_dataset, read_manifest


def test_hh_rlhf_quarantines_divergent_and_empty(human_labels, tmp_path):
    # 2,312 rows: 5 transcripts diverge before the last assistant turn and 4 end with an empty
    # answer (disjoint sets) -> quarantined, with those reasons; 2,303 pairs written.
    report = convert_labels_file(human_labels / "hh-rlhf_harmless-base_test.jsonl.gz", tmp_path / "hh", "hh-rlhf",
                                 "pairwise", quarantine_path=tmp_path / "q")
    assert (report.read, report.written, report.quarantined, report.dropped_total) == (2312, 2303, 9, 0)
    assert report.quarantine_reasons == {"transcripts diverge before the last assistant turn": 5,
                                         "empty text in chosen": 4}
    table = read_dataset(tmp_path / "hh")
    assert table.num_rows == 2303
    assert table.column("prompt")[0].as_py()[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    manifest = read_manifest(tmp_path / "hh")
    assert manifest["provenance"]["source_sha256"] == "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
    assert manifest["provenance"]["accounting"]["quarantined"] == 9
    q = read_dataset(tmp_path / "q")
    assert q.num_rows == 9 and read_manifest(tmp_path / "q")["kind"] == "quarantine"


def test_alpaca_eval_draws_are_identical_outputs(human_labels, tmp_path):
    # preference 1:584, 2:205, 0:16; the 16 draws have identical outputs: a tie of a text with itself
    # says nothing, so it is dropped by rule (not quarantined as an error, issue #15 item 5).
    report = convert_labels_file(human_labels / "alpaca_eval_gpt4_annotations_alpaca-7b.json", tmp_path / "a",
                                 "alpaca-eval", "pairwise")
    assert (report.read, report.written, report.quarantined) == (805, 789, 0)
    assert report.dropped == {"tie of two identical texts (nothing to compare)": 16}
    table = read_dataset(tmp_path / "a")
    assert table.num_rows == 789 and set(table.column("source").to_pylist()) == {"ai"}


def test_oasst_sibling_ranks_become_listwise(human_labels, tmp_path):
    report = convert_labels_file(human_labels / "oasst1_en_validation.jsonl", tmp_path / "o", "oasst", "listwise")
    # 418 ranked groups (one per rank-0 message); 1 group has a single ranked reply.
    assert (report.read, report.written, report.quarantined) == (2022, 1550, 0)
    assert report.dropped == {"prompter turn without ranked replies": 361, "unranked reply": 110,
                              "single ranked reply (no ranking)": 1}
    table = read_dataset(tmp_path / "o")
    assert table.num_rows == 418
    lengths = pc.list_value_length(table.column("responses")).to_pylist()
    assert sum(lengths) == 1132 and max(lengths) == 5
    assert all(s == sorted(s, reverse=True) for s in table.column("scores").to_pylist())


def test_tulu_sheet_aggregates_annotators_and_reports_agreement(human_labels, tmp_path):
    report = convert_labels_file(human_labels / "tulu1_human_eval_annotations.xlsx", tmp_path / "t",
                                 "graded-pairwise", "pairwise")
    # 39 ties between identical completions are dropped by rule; one item whose annotators prefer
    # one of two identical texts is a contradiction: quarantined
    assert (report.read, report.written, report.quarantined) == (1302, 707, 1)
    assert report.quarantine_reasons == {"chosen == rejected": 1}
    assert report.dropped == {"blank row": 152, "tie (--ties drop)": 403,
                              "tie of two identical texts (nothing to compare)": 39}
    ag = report.info["agreement"]
    assert (ag["items"], ag["annotations"]) == (139, 310)
    assert ag["percent_agreement"] == pytest.approx(0.624, abs=1e-3)
    assert ag["krippendorff_alpha_nominal"] == pytest.approx(0.399, abs=1e-3)
    table = read_dataset(tmp_path / "t")
    assert table.num_rows == 635
    margins = table.column("margin").to_pylist()  # mean strength of the majority's votes
    assert min(margins) == 1.0 and max(margins) == 2.0 and 1.0 < sorted(set(margins))[1] < 2.0
    assert read_manifest(tmp_path / "t")["provenance"]["agreement"]["items"] == 139


def _sibling_groups(messages, value_of):
    """Expected oasst groups, from the raw rows: each prompter turn's replies having a value (2 or
    more), and those whose values all tie (dropped with --ties drop)."""
    from collections import defaultdict

    groups = defaultdict(list)
    for m in messages:
        if m["role"] == "assistant" and value_of(m) is not None:
            groups[m["parent_id"]].append(float(value_of(m)))
    rated = [g for g in groups.values() if len(g) >= 2]
    return rated, [g for g in rated if len(set(g)) == 1]


def _converts_by_aspect(path, out, aspect, rated, written, dropped):
    """oasst --aspect ASPECT: the accounting, and each untied group's values as scores, best first."""
    from alignflow.feedback.labels import Options

    report = convert_labels_file(path, out, "oasst", "listwise", Options(aspect=aspect))
    assert (report.read, report.written, report.quarantined) == (2022, written, 0) and report.adds_up
    assert report.dropped == dropped
    expected = sorted(sorted(g, reverse=True) for g in rated if len(set(g)) > 1)
    assert sorted(read_dataset(out).column("scores").to_pylist()) == expected


def test_oasst_labels_kept_and_aspect_orders_siblings(human_labels, tmp_path):
    import json
    from collections import Counter

    path = human_labels / "oasst1_en_validation.jsonl"
    messages = [json.loads(line) for line in path.open()]
    labels = {m["message_id"]: m["labels"] for m in messages}
    # default (rank) output carries every response's labels unchanged
    convert_labels_file(path, tmp_path / "o", "oasst", "listwise")
    table = read_dataset(tmp_path / "o")
    def key(text, lab):
        return json.dumps([text, lab], sort_keys=True)

    source = Counter(key(m["text"], m["labels"]) for m in messages if m["role"] == "assistant")
    got = Counter(key(r, lab) for rs, ls in zip(table.column("responses").to_pylist(),
                                                 table.column("response_labels").to_pylist()) for r, lab in zip(rs, ls))
    assert sum(got.values()) == 1132 and not got - source  # each (response, labels) as some message has it
    # --aspect quality: siblings that have a quality label, best first (expected groups from the raw rows)
    quality = {mid: dict(zip(lab["name"], lab["value"])).get("quality") for mid, lab in labels.items() if lab}
    rated, tied = _sibling_groups(messages, lambda m: quality.get(m["message_id"]))
    assert (len(rated), sum(len(g) + 1 for g in rated), len(tied), sum(len(g) + 1 for g in tied)) == (423, 1603, 15, 49)
    _converts_by_aspect(path, tmp_path / "q", "quality", rated, written=1554, dropped={
        "reply without label quality": 6, "single rated reply (no ranking)": 57,
        "prompter turn without rated replies": 356, "all responses tie (--ties drop)": 49})  # 408 rows


def test_oasst_emojis_and_detoxify_kept_and_thumbs_up_orders_siblings(human_labels, tmp_path):
    import json

    path = human_labels / "oasst1_en_validation.jsonl"
    messages = [json.loads(line) for line in path.open()]
    convert_labels_file(path, tmp_path / "o", "oasst", "listwise")
    table = read_dataset(tmp_path / "o")
    responses = sum(table.column("responses").to_pylist(), [])
    detox = sum(table.column("response_detoxify").to_pylist(), [])
    emojis = sum(table.column("response_emojis").to_pylist(), [])
    by_text = {m["text"]: m for m in messages if m["role"] == "assistant"}
    assert len(responses) == 1132 and sum(d is not None for d in detox) == 1132 and sum(e is not None for e in emojis) == 986
    assert all(e == (by_text[r]["emojis"] or None) for r, e in zip(responses, emojis) if e is not None)

    # --aspect emoji:+1: siblings ordered by thumbs up; a reply nobody reacted to (emojis null, 165 of
    # them) has 0 thumbs up, as one with other reactions only (issue #15 item 5: it used to be dropped)
    def thumbs_up(m):
        e = m["emojis"]
        return dict(zip(e["name"], e["count"])).get("+1", 0) if e and e["name"] else 0

    rated, tied = _sibling_groups(messages, thumbs_up)
    assert (len(rated), sum(len(g) + 1 for g in rated), len(tied), sum(len(g) + 1 for g in tied)) == (425, 1611, 84, 298)
    _converts_by_aspect(path, tmp_path / "e", "emoji:+1", rated, written=1313, dropped={
        "single rated reply (no ranking)": 57, "prompter turn without rated replies": 354,
        "all responses tie (--ties drop)": 298})  # 341 rows
