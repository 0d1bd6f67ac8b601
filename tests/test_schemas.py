"""Schemas of every kind, prompt promotion and ids, the validator's quarantine reasons."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignflow.schemas import KINDS, SCHEMAS, messages, prompt_id, prompt_ids, to_messages_array, validate

GOOD_ROWS = {
    "prompts": {"prompt": "Reverse: abc"},
    "samples": {"prompt": "Reverse: abc", "response": "cba", "model": "toy", "logp": -3.5, "n_tokens": 3},
    "pairwise": {"prompt": "Reverse: abc", "chosen": "cba", "rejected": "abc", "margin": 1.0, "source": "human"},
    "listwise": {"prompt": "Reverse: abc", "responses": ["cba", "cab", "abc"], "scores": [1.0, 0.5, 0.0]},
    "binary": {"prompt": "Reverse: abc", "response": "cba", "label": True},
    "sft": {"prompt": "Reverse: abc", "response": "cba"},
    "critiques": {
        "prompt": "Reverse: abc",
        "response": "cba",
        "rounds": [{"principle": "be correct", "critique": "fine", "revision": "cba"}],
    },
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_through_validate(kind):
    table = pa.Table.from_pylist([GOOD_ROWS[kind]] * 3)
    result = validate(table, kind)
    assert result.quarantined.num_rows == 0
    assert result.valid.num_rows == 3
    assert result.valid.schema.names[: len(SCHEMAS[kind])] == SCHEMAS[kind].names
    for field in SCHEMAS[kind]:
        assert result.valid.schema.field(field.name).type == field.type
    row = result.valid.to_pylist()[0]
    assert row["prompt"] == [{"role": "user", "content": "Reverse: abc"}]
    assert row["prompt_id"] == prompt_id("Reverse: abc")
    # a second pass over already canonical rows changes nothing
    again = validate(result.valid, kind)
    assert again.valid.equals(result.valid)


def test_plain_string_becomes_one_user_turn_and_nulls_stay_null():
    arr = to_messages_array(pa.array(["hello", None]))
    assert arr.to_pylist() == [[{"role": "user", "content": "hello"}], None]


def test_prompt_id_is_stable_and_distinguishes_roles_and_turns():
    assert prompt_id("hi") == prompt_id([{"role": "user", "content": "hi"}])
    assert prompt_id("hi") == "26def13bce0d619e"  # fixed forever: ids name data on disk
    assert prompt_id("hi") != prompt_id([{"role": "system", "content": "hi"}])
    two_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    joined = [{"role": "user", "content": "a\x1eassistant\x1fb"}]
    assert prompt_id(two_turns) != prompt_id("ab")
    ids = prompt_ids(pa.array([messages("x"), messages("y"), messages("x")], type=SCHEMAS["prompts"].field("prompt").type))
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert all(len(i.as_py()) == 16 for i in ids)
    assert prompt_id(joined)  # separators inside content do not crash


def test_given_prompt_id_is_kept():
    table = pa.table({"prompt_id": ["mine", None], "prompt": ["a", "b"], "response": ["x", "y"]})
    ids = validate(table, "sft").valid.column("prompt_id").to_pylist()
    assert ids == ["mine", prompt_id("b")]


BAD_PAIRWISE = [
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen == rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty text in chosen"),
    ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "empty text in chosen"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "null field chosen"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "null field prompt"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty text in prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "NaN margin"),
    ({"prompt": [{"role": "wizard", "content": "p"}], "chosen": "a", "rejected": "b"}, "unknown role in prompt"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "empty prompt"),
]


def test_pairwise_quarantine_reasons_with_exact_counts():
    good = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0}] * 4
    rows = good + [r for r, _ in BAD_PAIRWISE[:7]]
    result = validate(pa.Table.from_pylist(rows), "pairwise")
    assert result.valid.num_rows == 4
    assert result.quarantined.num_rows == 7
    assert result.n_in == len(rows)
    got = dict(zip(result.quarantined.column("row").to_pylist(), result.quarantined.column("reason").to_pylist()))
    for offset, (_, reason) in enumerate(BAD_PAIRWISE[:7]):
        assert got[4 + offset] == reason
    # structured prompts with a bad role / no turns
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r, _ in BAD_PAIRWISE[7:]]
    result = validate(pa.Table.from_pylist(rows), "pairwise")
    assert result.quarantined.column("reason").to_pylist() == ["unknown role in prompt", "empty prompt"]


def test_missing_field_and_wrong_type():
    table = pa.table({"prompt": ["p", "q"], "response": ["a", "b"]})
    result = validate(table, "binary")
    assert result.valid.num_rows == 0
    assert set(result.quarantined.column("reason").to_pylist()) == {"missing field label"}

    table = pa.table({"prompt": ["p", "q", "r"], "responses": [["a", "b"], ["a", "b"], ["a", "b"]],
                      "scores": [["1", "2"], ["x", "2"], ["3", "N/A"]]})
    result = validate(table, "listwise")
    assert result.valid.num_rows == 1
    assert result.valid.column("scores").to_pylist() == [[1.0, 2.0]]
    reasons = result.quarantined.column("reason").to_pylist()
    assert reasons == ["wrong type for scores (expected list<item: double>)"] * 2


def test_listwise_reasons():
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 2.0, 3.0]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [1.0]},
        {"prompt": "p", "responses": ["a"], "scores": [1.0]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, math.nan]},
        {"prompt": "p", "responses": ["a", ""], "scores": [1.0, 2.0]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.0]},  # ties are allowed
    ]
    result = validate(pa.Table.from_pylist(rows), "listwise")
    assert result.valid.num_rows == 2
    assert result.quarantined.column("reason").to_pylist() == [
        "responses and scores differ in length",
        "fewer than two responses",
        "NaN score",
        "empty text in responses",
    ]
    assert result.reasons == {
        "responses and scores differ in length": 1,
        "fewer than two responses": 1,
        "NaN score": 1,
        "empty text in responses": 1,
    }


def test_quarantine_keeps_the_original_row():
    import json

    result = validate(pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "a", "extra": 7}]), "pairwise")
    record = json.loads(result.quarantined.column("record")[0].as_py())
    assert record == {"prompt": "p", "chosen": "a", "rejected": "a", "extra": 7}


def test_optional_canonical_columns_are_cast_and_extras_kept():
    table = pa.table({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "ref_chosen_logps": [-1],
                      "chosen_tokens": [3.0], "note": ["keep me"]})
    valid = validate(table, "pairwise").valid
    assert valid.schema.field("ref_chosen_logps").type == pa.float64()
    assert valid.schema.field("chosen_tokens").type == pa.int64()
    assert valid.column("note").to_pylist() == ["keep me"]


text = st.one_of(st.none(), st.text(max_size=4), st.sampled_from(["a", "b", " "]))
score = st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-3, 3), st.sampled_from(["N/A", "1.5"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text, "margin": score}),
                min_size=1, max_size=12))
def test_fuzzed_pairwise_counts_always_add_up(rows):
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        table = pa.Table.from_pylist([{k: (None if v is None else str(v)) for k, v in r.items()} for r in rows])
    result = validate(table, "pairwise")
    assert result.valid.num_rows + result.quarantined.num_rows == len(rows)
    for row in result.valid.to_pylist():
        assert row["chosen"].strip() and row["rejected"].strip() and row["chosen"] != row["rejected"]
        assert row["margin"] is None or not math.isnan(row["margin"])
    assert all(result.quarantined.column("reason").to_pylist())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "prompt": text,
    "responses": st.one_of(st.none(), st.lists(text, max_size=4)),
    "scores": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(allow_nan=True)), max_size=4)),
}), min_size=1, max_size=10))
def test_fuzzed_listwise_counts_always_add_up(rows):
    result = validate(pa.Table.from_pylist(rows), "listwise")
    assert result.valid.num_rows + result.quarantined.num_rows == len(rows)
    for row in result.valid.to_pylist():
        assert len(row["responses"]) == len(row["scores"]) >= 2
        assert all(not math.isnan(s) for s in row["scores"])
