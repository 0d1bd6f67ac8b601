"""Hand-written rows for every format (ties, graded, several annotators, broken rows), file
encodings, and round trips through each exporter."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.feedback.labels import FORMATS, LabelsError, Options, convert_labels_file, read_file
from alignflow.schemas.store import read_dataset, read_manifest


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def convert(tmp_path, rows, fmt, to="pairwise", name="in.jsonl", **options):
    src = write_jsonl(tmp_path / name, rows) if name.endswith(".jsonl") else _write_json(tmp_path / name, rows)
    out = tmp_path / f"out-{fmt}-{to}"
    report = convert_labels_file(src, out, fmt, to, Options(**options), overwrite=True)  # helpers reuse the out name
    assert report.adds_up
    return report, read_dataset(out)


def _write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def pairs_of(table):
    return list(zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist()))


def test_registry_lists_every_format_the_issue_names():
    names = {"hh-rlhf", "shp", "openai-comparisons", "ultrafeedback", "oasst", "nectar", "helpsteer2", "pku-saferlhf",
             "arena", "alpaca-eval", "graded-pairwise", "argilla", "label-studio", "trl-preference", "trl-unpaired",
             "openai-dpo", "pairwise", "listwise", "binary", "sft", "prompts"}
    assert names <= set(FORMATS)
    assert {n for n, f in FORMATS.items() if f.export} == {
        "hh-rlhf", "trl-preference", "trl-unpaired", "openai-dpo", "pairwise", "listwise", "binary", "sft", "prompts",
        "llamafactory", "llamafactory-kto", "axolotl-chatml.intel", "axolotl-chatml.argilla", "axolotl-chatml.ultra",
        "axolotl-chat_template", "sharegpt", "distilabel-ultrafeedback", "distilabel-prometheus"}


def test_hh_rlhf_rows(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.",
             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."},
            {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"},  # diverge
            {"chosen": "no markers", "rejected": "none"},
            {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"}]  # empty answer
    report, table = convert(tmp_path, rows, "hh-rlhf")
    assert (report.read, report.written, report.quarantined) == (4, 1, 3)
    assert set(report.quarantine_reasons) == {"transcripts diverge before the last assistant turn",
                                              "no Assistant turn in a transcript", "empty text in chosen"}
    assert table.column("prompt").to_pylist()[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                                     {"role": "user", "content": "joke?"}]
    assert pairs_of(table) == [("A pun.", "No.")]


def test_shp_rows(tmp_path):
    rows = [{"history": "Q?", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_ratio": 2.0},
            {"history": "R?", "human_ref_A": "c", "human_ref_B": "d", "labels": 0, "score_ratio": 4.0},
            {"history": "S?", "human_ref_A": "e", "human_ref_B": "f", "labels": 7, "score_ratio": 1.0}]
    report, table = convert(tmp_path, rows, "shp")
    assert pairs_of(table) == [("a", "b"), ("d", "c")] and report.quarantined == 1
    assert table.column("margin").to_pylist() == pytest.approx([0.6931, 1.3863], abs=1e-4)


def test_openai_comparisons_rows(tmp_path):
    rows = [{"info": {"post": "long post", "title": "T", "subreddit": "tifu"}, "summaries": [{"text": "s0"}, {"text": "s1"}],
             "choice": 1, "extra": {"confidence": 7}},
            {"info": {"post": "p2", "title": "T2", "subreddit": "x"}, "summaries": [{"text": "u0"}, {"text": "u1"}],
             "choice": 0, "extra": {"confidence": None}}]
    report, table = convert(tmp_path, rows, "openai-comparisons")
    assert pairs_of(table) == [("s1", "s0"), ("u0", "u1")] and table.column("margin").to_pylist() == [7.0, None]
    assert table.column("prompt")[0].as_py()[0]["content"] == "SUBREDDIT: r/tifu\nTITLE: T\nPOST: long post\n\nTL;DR:"


def _uf(resp, h, o):
    return {"response": resp, "annotations": {"helpfulness": {"Rating": h}, "honesty": {"Rating": o},
                                              "instruction_following": {"Rating": "3"}, "truthfulness": {"Rating": "3"}},
            "overall_score": 5.0}


def test_ultrafeedback_aspects_and_na(tmp_path):
    rows = [{"instruction": "I1", "completions": [_uf("a", "5", "1"), _uf("b", "1", "5"), _uf("c", "N/A", "3")]},
            {"instruction": "I2", "completions": [_uf("d", "N/A", "2"), _uf("e", "4", "2")]}]
    report, table = convert(tmp_path, rows, "ultrafeedback", "listwise", aspect="helpfulness")
    assert table.column("responses").to_pylist() == [["a", "b"]]  # c unrated; I2 left with one response
    assert report.dropped == {"fewer than two rated responses": 1} and report.info["unrated_responses"] == 2
    report, table = convert(tmp_path, rows, "ultrafeedback", "pairwise", aspect="honesty")
    assert pairs_of(table) == [("b", "c"), ("b", "a"), ("c", "a")] and report.dropped == {
        "all responses tie (a pair cannot hold a tie)": 1}


def test_oasst_nested_tree_export(tmp_path):
    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "message_id": "m0", "role": "prompter", "text": "root?", "replies": [
            {"message_id": "m1", "role": "assistant", "text": "good", "rank": 0, "replies": [
                {"message_id": "m3", "role": "prompter", "text": "more?", "replies": [
                    {"message_id": "m4", "role": "assistant", "text": "yes", "rank": 1},
                    {"message_id": "m5", "role": "assistant", "text": "sure", "rank": 0}]}]},
            {"message_id": "m2", "role": "assistant", "text": "bad", "rank": 1},
            {"message_id": "m6", "role": "assistant", "text": "unranked", "rank": None}]}}
    report, table = convert(tmp_path, [tree], "oasst", "listwise")
    assert (report.read, report.written) == (7, 6) and report.dropped == {"unranked reply": 1}
    rows = {r["prompt"][-1]["content"]: r for r in table.to_pylist()}
    assert rows["root?"]["responses"] == ["good", "bad"] and rows["root?"]["scores"] == [0.0, -1.0]
    assert [m["role"] for m in rows["more?"]["prompt"]] == ["user", "assistant", "user"]
    assert rows["more?"]["responses"] == ["sure", "yes"]


def _labels(**values):
    return {"name": list(values), "value": [v for v, _ in values.values()], "count": [c for _, c in values.values()]}


def test_oasst_labels_are_kept_and_can_order_siblings(tmp_path):
    # flat rows as the HF export holds them: labels = {name: [...], value: [...], count: [...]}
    rows = [{"message_id": "p", "parent_id": None, "role": "prompter", "text": "Q?", "rank": None,
             "labels": _labels(quality=(0.5, 3))},
            {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "A", "rank": 0,
             "labels": _labels(quality=(0.25, 4), toxicity=(0.5, 2))},
            {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "B", "rank": 1,
             "labels": _labels(quality=(0.75, 3), toxicity=(0.0, 2))},
            {"message_id": "c", "parent_id": "p", "role": "assistant", "text": "C", "rank": None,  # unranked, labelled
             "labels": _labels(quality=(1.0, 2))},
            {"message_id": "d", "parent_id": "p", "role": "assistant", "text": "D", "rank": 2, "labels": None}]
    report, table = convert(tmp_path, rows, "oasst", "listwise")  # default: by rank, labels carried along
    assert table.column("responses").to_pylist() == [["A", "B", "D"]] and report.dropped == {"unranked reply": 1}
    assert table.column("response_labels").to_pylist()[0] == [rows[1]["labels"], rows[2]["labels"], None]
    assert table.column("prompt_labels").to_pylist() == [rows[0]["labels"]]
    report, table = convert(tmp_path, rows, "oasst", "listwise", aspect="quality")
    assert table.column("responses").to_pylist() == [["C", "B", "A"]]  # every sibling with a quality label
    assert table.column("scores").to_pylist() == [[1.0, 0.75, 0.25]]
    assert table.column("response_labels").to_pylist()[0][0] == rows[3]["labels"]
    assert (report.written, report.dropped) == (4, {"reply without label quality": 1}) and report.adds_up
    report, table = convert(tmp_path, rows, "oasst", "pairwise", aspect="quality=2,toxicity=1", strategy="best-vs-worst")
    assert pairs_of(table) == [("B", "A")]  # only A and B have both labels; B (1.5 + 0) / 3, A (0.5 + 0.5) / 3
    assert table.column("margin").to_pylist() == pytest.approx([0.5 - 1 / 3])
    with pytest.raises(LabelsError, match=r"unknown aspect 'nope'; this file has: rank, quality, toxicity"):
        convert(tmp_path, rows, "oasst", "listwise", aspect="nope")


def test_oasst_tree_export_labels_dict_form(tmp_path):
    # the nested tree export holds labels as {label: {value, count}}; flat rows may too
    tree = {"message_tree_id": "t1", "prompt": {
        "message_id": "m0", "role": "prompter", "text": "root?", "labels": {"quality": {"value": 0.5, "count": 2}},
        "replies": [{"message_id": "m1", "role": "assistant", "text": "x", "rank": 1,
                     "labels": {"quality": {"value": 0.9, "count": 3}, "humor": {"value": 0.1, "count": 3}}},
                    {"message_id": "m2", "role": "assistant", "text": "y", "rank": 0,
                     "labels": {"quality": {"value": 0.2, "count": 3}}}]}}
    report, table = convert(tmp_path, [tree], "oasst", "listwise", name="tree.jsonl")
    assert table.column("responses").to_pylist() == [["y", "x"]]
    assert table.column("response_labels").to_pylist()[0] == [
        {"name": ["quality"], "value": [0.2], "count": [3]},
        {"name": ["quality", "humor"], "value": [0.9, 0.1], "count": [3, 3]}]
    report, table = convert(tmp_path, [tree], "oasst", "listwise", name="tree2.jsonl", aspect="quality")
    assert table.column("responses").to_pylist() == [["x", "y"]]
    flat = [{"message_id": "m0", "parent_id": None, "role": "prompter", "text": "root?", "rank": None, "labels": None},
            {"message_id": "m1", "parent_id": "m0", "role": "assistant", "text": "x", "rank": 1,
             "labels": {"humor": {"value": 0.1, "count": 3}, "quality": {"value": 0.9, "count": 3}}},
            {"message_id": "m2", "parent_id": "m0", "role": "assistant", "text": "y", "rank": 0,
             "labels": {"quality": {"value": 0.2, "count": 1}}}]
    with pytest.raises(LabelsError, match="nothing written") as err:  # y has no humor label: x is left alone
        convert(tmp_path, flat, "oasst", "listwise", name="flat.jsonl", aspect="humor=0,quality=1")
    assert ("1 reply without label humor+quality; 1 single rated reply (no ranking); 1 prompter turn without rated "
            "replies") in str(err.value)
    report, table = convert(tmp_path, flat, "oasst", "listwise", name="flat2.jsonl", aspect="quality")
    assert table.column("responses").to_pylist() == [["x", "y"]] and table.column("scores").to_pylist() == [[0.9, 0.2]]
    assert table.column("response_labels").to_pylist()[0][1] == {"name": ["quality"], "value": [0.2], "count": [1]}


def test_nectar_seven_wise(tmp_path):
    answers = [{"answer": f"ans{r}", "model": "m", "rank": r} for r in (3, 1, 2, 7, 5, 4, 6)]
    rows = [{"prompt": "\n\nHuman: What?\n\nAssistant:", "answers": answers}]
    report, table = convert(tmp_path, rows, "nectar", "pairwise", strategy="best-vs-worst")
    assert pairs_of(table) == [("ans1", "ans7")] and table.column("margin").to_pylist() == [6.0]
    assert table.column("prompt").to_pylist()[0] == [{"role": "user", "content": "What?"}]
    report, table = convert(tmp_path, rows, "nectar", "pairwise")
    assert table.num_rows == 21


def test_helpsteer2_both_files(tmp_path):
    attrs = [{"prompt": "P", "response": "r1", "helpfulness": 4, "correctness": 1, "coherence": 4, "complexity": 2, "verbosity": 2},
             {"prompt": "P", "response": "r2", "helpfulness": 2, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2},
             {"prompt": "Q", "response": "r3", "helpfulness": 3, "correctness": 3, "coherence": 3, "complexity": 3, "verbosity": 3}]
    report, table = convert(tmp_path, attrs, "helpsteer2", "pairwise")
    assert pairs_of(table) == [("r1", "r2")] and report.dropped == {"fewer than two rated responses": 1}
    report, table = convert(tmp_path, attrs, "helpsteer2", "pairwise", aspect="correctness")
    assert pairs_of(table) == [("r2", "r1")]
    prefs = [{"prompt": "P", "response_1": "a", "response_2": "b", "preference_strength": -2},
             {"prompt": "P", "response_1": "c", "response_2": "d", "preference_strength": 3},
             {"prompt": "P", "response_1": "e", "response_2": "f", "preference_strength": 0},
             {"prompt": "P", "response_1": "g", "response_2": "h", "preference_strength": 9}]
    report, table = convert(tmp_path, prefs, "helpsteer2", "pairwise", name="pref.jsonl")
    assert pairs_of(table) == [("a", "b"), ("d", "c")] and table.column("margin").to_pylist() == [2.0, 3.0]
    assert report.dropped == {"tie (--ties drop)": 1} and report.quarantined == 1
    report, table = convert(tmp_path, prefs, "helpsteer2", "binary", name="pref2.jsonl", ties="keep")
    assert table.num_rows == 6 and table.column("label").to_pylist()[4:] == [True, True]


def test_helpsteer2_multi_turn_prompts_become_messages(tmp_path):
    # HelpSteer2 keeps earlier turns inline: "{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n{user 2}"
    multi = "c++ std\n<extra_id_1>Assistant\nThe standard library.\n<extra_id_1>User\nand vectors?"
    turns = [{"role": "user", "content": "c++ std"}, {"role": "assistant", "content": "The standard library."},
             {"role": "user", "content": "and vectors?"}]
    attrs = [{"prompt": multi, "response": "r1", "helpfulness": 4}, {"prompt": "one turn ", "response": "r3", "helpfulness": 2},
             {"prompt": multi, "response": "r2", "helpfulness": 1}, {"prompt": "one turn ", "response": "r4", "helpfulness": 3}]
    report, table = convert(tmp_path, attrs, "helpsteer2", "listwise")
    prompts = {r["responses"][0]: r["prompt"] for r in table.to_pylist()}
    assert prompts == {"r1": turns, "r3": [{"role": "user", "content": "one turn "}]} and report.written == 4
    prefs = [{"prompt": multi, "response_1": "a", "response_2": "b", "preference_strength": 2},
             {"prompt": "x\n<extra_id_1>Assistant\n\n<extra_id_1>User\ny", "response_1": "c", "response_2": "d",
              "preference_strength": -1},  # an empty earlier turn: quarantined, not glued together
             {"prompt": "solo", "response_1": "e", "response_2": "f", "preference_strength": -3}]
    report, table = convert(tmp_path, prefs, "helpsteer2", "pairwise", name="pref.jsonl")
    assert table.column("prompt").to_pylist() == [turns, [{"role": "user", "content": "solo"}]]
    assert pairs_of(table) == [("b", "a"), ("e", "f")] and report.quarantine_reasons == {"empty text in prompt": 1}


def test_pku_saferlhf_axes(tmp_path):
    rows = [{"prompt": "P", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0,
             "is_response_0_safe": True, "is_response_1_safe": False}]
    _, table = convert(tmp_path, rows, "pku-saferlhf")
    assert pairs_of(table) == [("b", "a")]
    _, table = convert(tmp_path, rows, "pku-saferlhf", aspect="safety")
    assert pairs_of(table) == [("a", "b")]
    report, table = convert(tmp_path, rows, "pku-saferlhf", "binary", aspect="is_safe")
    assert table.column("label").to_pylist() == [True, False] and report.written == 1


def test_arena_json_and_one_hot_csv(tmp_path):
    conv = lambda ans: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ans}]  # noqa: E731
    rows = [{"model_a": "m1", "model_b": "m2", "winner": "model_b", "conversation_a": conv("A1"), "conversation_b": conv("B1")},
            {"model_a": "m1", "model_b": "m2", "winner": "tie", "conversation_a": conv("A2"), "conversation_b": conv("B2")},
            {"model_a": "m1", "model_b": "m2", "winner": "tie (bothbad)", "conversation_a": conv("A3"), "conversation_b": conv("B3")},
            {"model_a": "m1", "model_b": "m2", "winner": "??", "conversation_a": conv("A4"), "conversation_b": conv("B4")},
            {"model_a": "m1", "model_b": "m2", "winner": "model_a",
             "conversation_a": conv("x") + conv("A5"), "conversation_b": conv("y") + conv("B5")}]
    report, table = convert(tmp_path, rows, "arena")
    assert pairs_of(table) == [("B1", "A1")]
    assert report.dropped == {"tie (--ties drop)": 2} and report.quarantine_reasons == {
        "winner not model_a / model_b / tie / tie (bothbad)": 1, "conversations differ before the final answer (--multi-turn whole keeps them)": 1}
    _, table = convert(tmp_path, rows, "arena", "binary", ties="keep")
    assert table.column("label").to_pylist() == [True, False, True, True, False, False]
    csv = tmp_path / "arena.csv"
    csv.write_text('id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n'
                   '1,m1,m2,"[""hi""]","[""A""]","[""B""]",1,0,0\n'
                   '2,m1,m2,"[""q1"",""q2""]","[""a1"",""a2""]","[""a1"",""b2""]",0,1,0\n'
                   '3,m1,m2,"[""hi""]","[""C""]","[""D""]",0,0,1\n'
                   '4,m1,m2,"[""hi""]","[""E""]","[""F""]",1,1,0\n')
    report = convert_labels_file(csv, tmp_path / "arena-csv", "arena", "pairwise")
    table = read_dataset(tmp_path / "arena-csv")
    assert pairs_of(table) == [("A", "B"), ("b2", "a2")]
    assert [m["content"] for m in table.column("prompt")[1].as_py()] == ["q1", "a1", "q2"]
    assert report.dropped == {"tie (--ties drop)": 1} and report.quarantine_reasons == {"winner columns are not one-hot": 1}


def test_alpaca_eval_draws_and_weighted(tmp_path):
    rows = [{"instruction": "I", "output_1": "a", "output_2": "b", "preference": 1},
            {"instruction": "I", "output_1": "c", "output_2": "d", "preference": 2},
            {"instruction": "I", "output_1": "e", "output_2": "f", "preference": 1.5},
            {"instruction": "I", "output_1": "g", "output_2": "h", "preference": 1.75},
            {"instruction": "I", "output_1": "i", "output_2": "j", "preference": 0},
            {"instruction": "I", "output_1": "k", "output_2": "l", "preference": 3}]
    report, table = convert(tmp_path, rows, "alpaca-eval", name="ae.json")
    assert pairs_of(table) == [("a", "b"), ("d", "c"), ("h", "g")]
    assert table.column("margin").to_pylist() == [1.0, 1.0, 0.5]
    assert report.dropped == {"tie (--ties drop)": 2} and report.quarantined == 1


def test_graded_pairwise_multi_annotator_csv(tmp_path):
    src = tmp_path / "graded.csv"
    src.write_text("prompt,completion_a,completion_b,preference,evaluator,completion_a_is_acceptable,completion_b_is_acceptable\n"
                   "P,x,y,a-is-better,e1,yes,no\n"
                   "P,y,x,b-is-slightly-better,e2,no,yes\n"  # same item shown swapped: agrees (x better)
                   "P,x,y,tie,e3,yes,yes\n"
                   "Q,u,v,b-is-better,e1,no,yes\n"
                   "Q,u,v,maybe,e2,no,yes\n")
    report = convert_labels_file(src, tmp_path / "g", "graded-pairwise", "pairwise")
    table = read_dataset(tmp_path / "g")
    assert pairs_of(table) == [("x", "y"), ("v", "u")]
    assert table.column("annotators").to_pylist() == [3, 1] and table.column("margin").to_pylist() == [1.5, 2.0]
    assert report.quarantine_reasons == {"preference not one of a-is-better, a-is-slightly-better, tie, "
                                         "b-is-slightly-better, b-is-better": 1}
    ag = report.info["agreement"]
    assert (ag["items"], ag["annotations"]) == (1, 3) and ag["percent_agreement"] == pytest.approx(1 / 3, abs=1e-4)
    report = convert_labels_file(src, tmp_path / "gb", "graded-pairwise", "binary", Options(aspect="acceptable"))
    got = dict(zip(read_dataset(tmp_path / "gb").column("response").to_pylist(),
                   read_dataset(tmp_path / "gb").column("label").to_pylist()))
    assert got == {"x": True, "y": False, "u": False, "v": True}


def test_argilla_rating_and_ranking(tmp_path):
    rating = [{"prompt": "P", "response": "a", "quality.responses": [5, 4]},
              {"prompt": "P", "response": "b", "quality.responses": [2]},
              {"prompt": "P", "response": "c", "quality.responses": []}]
    report, table = convert(tmp_path, rating, "argilla", "pairwise")
    assert pairs_of(table) == [("a", "b")] and table.column("margin").to_pylist() == [2.5] and report.quarantined == 1
    ranking = [{"prompt": "P", "response-1": "a", "response-2": "b", "response-3": "c",
                "ranking.responses": [[{"value": "response-2", "rank": 1}, {"value": "response-1", "rank": 2},
                                       {"value": "response-3", "rank": 3}]]}]
    _, table = convert(tmp_path, ranking, "argilla", "pairwise", name="rank.jsonl", strategy="adjacent")
    assert pairs_of(table) == [("b", "a"), ("a", "c")]


def test_label_studio_pairwise_rating_ranker(tmp_path):
    def ann(result):
        return {"result": [result], "completed_by": 1}

    pw = [{"data": {"prompt": "P", "answer1": "L", "answer2": "R"}, "annotations": [
        ann({"type": "pairwise", "value": {"selected": "right"}, "to_name": ["answer1", "answer2"]}),
        ann({"type": "pairwise", "value": {"selected": "right"}, "to_name": ["answer1", "answer2"]})]},
          {"data": {"prompt": "P2", "answer1": "L2", "answer2": "R2"}, "annotations": [
        ann({"type": "pairwise", "value": {"selected": "left"}}), ann({"type": "pairwise", "value": {"selected": "right"}})]},
          {"data": {"prompt": "P3", "answer1": "x", "answer2": "y"}, "annotations": []}]
    report, table = convert(tmp_path, pw, "label-studio", name="ls.json")
    assert pairs_of(table) == [("R", "L")] and report.dropped == {"tie (--ties drop)": 1} and report.quarantined == 1
    ranker = [{"data": {"prompt": "P", "items": [{"id": "i1", "body": "one"}, {"id": "i2", "body": "two"}]},
               "annotations": [ann({"type": "ranker", "value": {"ranker": {"rank": ["i2", "i1"]}}})]}]
    _, table = convert(tmp_path, ranker, "label-studio", name="rk.json")
    assert pairs_of(table) == [("two", "one")]
    rating = [{"data": {"prompt": "P", "response": "a"}, "annotations": [ann({"type": "rating", "value": {"rating": 5}})]},
              {"data": {"prompt": "P", "response": "b"}, "annotations": [ann({"type": "rating", "value": {"rating": 2}})]}]
    _, table = convert(tmp_path, rating, "label-studio", "listwise", name="rt.json")
    assert table.column("scores").to_pylist() == [[5.0, 2.0]]


def test_trl_preference_standard_conversational_implicit(tmp_path):
    msgs = lambda *t: [{"role": r, "content": c} for r, c in t]  # noqa: E731
    std = [{"prompt": "P", "chosen": "good", "rejected": "bad", "margin": 0.5}]
    _, table = convert(tmp_path, std, "trl-preference", name="std.jsonl")
    assert pairs_of(table) == [("good", "bad")] and table.column("margin").to_pylist() == [0.5]
    conv = [{"prompt": msgs(("user", "P")), "chosen": msgs(("assistant", "good")), "rejected": msgs(("assistant", "bad"))}]
    _, table = convert(tmp_path, conv, "trl-preference", name="conv.jsonl")
    assert pairs_of(table) == [("good", "bad")]
    implicit = [{"chosen": msgs(("user", "P"), ("assistant", "good")), "rejected": msgs(("user", "P"), ("assistant", "bad"))},
                {"chosen": msgs(("user", "P"), ("assistant", "x")), "rejected": msgs(("user", "Q"), ("assistant", "y"))}]
    report, table = convert(tmp_path, implicit, "trl-preference", name="imp.jsonl")
    assert pairs_of(table) == [("good", "bad")] and table.column("prompt").to_pylist()[0] == msgs(("user", "P"))
    assert report.quarantine_reasons == {"implicit prompt: chosen and rejected differ before the last message": 1}
    implicit_text = [{"chosen": "Q: why? A: because", "rejected": "Q: why? A: dunno"}]
    _, table = convert(tmp_path, implicit_text, "trl-preference", name="imp-text.jsonl")
    assert pairs_of(table) == [("because", "dunno")]


def test_trl_unpaired_and_openai_dpo(tmp_path):
    rows = [{"prompt": "P", "completion": "c1", "label": True}, {"prompt": "P", "completion": "c2", "label": False},
            {"prompt": "P", "completion": "c3", "label": "maybe"}]
    report, table = convert(tmp_path, rows, "trl-unpaired", "binary")
    assert table.column("label").to_pylist() == [True, False] and report.quarantined == 1
    dpo = [{"input": {"messages": [{"role": "user", "content": "P"}]},
            "preferred_output": [{"role": "assistant", "content": "y"}],
            "non_preferred_output": [{"role": "assistant", "content": "n"}]}]
    _, table = convert(tmp_path, dpo, "openai-dpo")
    assert pairs_of(table) == [("y", "n")]


@pytest.mark.parametrize("target,style", [("hh-rlhf", None), ("trl-preference", "standard"),
                                          ("trl-preference", "conversational"), ("trl-preference", "implicit"),
                                          ("openai-dpo", None), ("pairwise", None)])
@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_round_trip_pairwise_exporters(tmp_path, target, style, ext):
    rows = [{"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    exported = tmp_path / f"exp{ext}"
    r1 = convert_labels_file(src, exported, "trl-preference", target, Options(style=style))
    assert r1.written == 5 and exported.is_file()
    assert json.loads((tmp_path / f"exp{ext}.manifest.json").read_text())["provenance"]["target_format"] == target
    back = tmp_path / "back"
    r2 = convert_labels_file(exported, back, target, "pairwise")
    table = read_dataset(back)
    assert r2.written == 5
    assert pairs_of(table) == [(r["chosen"], r["rejected"]) for r in rows]
    assert [p[0]["content"] for p in table.column("prompt").to_pylist()] == [r["prompt"] for r in rows]


def test_round_trip_binary_and_listwise(tmp_path):
    rows = [{"prompt": "P", "completion": f"c{i}", "label": i % 2 == 0} for i in range(4)]
    src = write_jsonl(tmp_path / "u.jsonl", rows)
    for ext in (".jsonl.gz", ".json", ".csv"):
        out = tmp_path / f"u-out{ext}"
        convert_labels_file(src, out, "trl-unpaired", "trl-unpaired")
        back = convert_labels_file(out, tmp_path / f"u-back{ext[1:3]}", "trl-unpaired", "binary", overwrite=True)
        assert back.written == 4
        assert read_dataset(tmp_path / f"u-back{ext[1:3]}").column("label").to_pylist() == [True, False, True, False]
    lw = [{"prompt": "P", "responses": ["a", "b", "c"], "scores": [3.0, 1.0, 2.0]}]
    src = write_jsonl(tmp_path / "lw.jsonl", lw)
    convert_labels_file(src, tmp_path / "lw-out.parquet", "listwise", "listwise")
    convert_labels_file(tmp_path / "lw-out.parquet", tmp_path / "lw-ds", "listwise", "listwise")
    # a store dataset folder reads back as input too
    report = convert_labels_file(tmp_path / "lw-ds", tmp_path / "lw-sft", "listwise", "sft")
    assert read_dataset(tmp_path / "lw-sft").column("response").to_pylist() == ["a"] and report.written == 1
    assert read_manifest(tmp_path / "lw-sft")["provenance"]["parent_datasets"] == [str(tmp_path / "lw-ds")]


def test_file_encodings_read_the_same(tmp_path):
    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "c", "rejected": "d"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    (tmp_path / "x.csv").write_text("prompt,chosen,rejected\nP,a,b\nQ,c,d\n")
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["prompt", "chosen", "rejected"])
    for r in rows:
        book.active.append([r["prompt"], r["chosen"], r["rejected"]])
    book.save(tmp_path / "x.xlsx")
    for ext in (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".xlsx"):
        assert read_file(tmp_path / f"x{ext}").select(["prompt", "chosen", "rejected"]).to_pylist() == rows, ext


def test_quarantine_dataset_and_bad_input_errors(tmp_path):
    rows = [{"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"}]
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(LabelsError, match="nothing written"):  # the quarantine is still written, to see why
        convert_labels_file(src, tmp_path / "o", "hh-rlhf", "pairwise", quarantine_path=tmp_path / "q")
    q = read_dataset(tmp_path / "q")
    assert q.column("row").to_pylist() == [0] and json.loads(q.column("record")[0].as_py())["chosen"].endswith("a")
    assert read_manifest(tmp_path / "q")["kind"] == "quarantine" and not (tmp_path / "o").exists()
    with pytest.raises(LabelsError, match=r"row 0: field 'chosen': missing"):
        convert_labels_file(write_jsonl(tmp_path / "w.jsonl", [{"a": 1}]), tmp_path / "o2", "hh-rlhf", "pairwise")
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(LabelsError, match=r"broken.jsonl: row 1: line 2 is not JSON"):
        convert_labels_file(tmp_path / "broken.jsonl", tmp_path / "o3", "hh-rlhf", "pairwise")
    with pytest.raises(LabelsError, match="unknown format"):
        convert_labels_file(src, tmp_path / "o4", "nope", "pairwise")
    with pytest.raises(LabelsError, match="import-only"):
        convert_labels_file(src, tmp_path / "o5.jsonl", "hh-rlhf", "shp")
    (tmp_path / "bad.xlsx").write_text("not a workbook")
    with pytest.raises(LabelsError, match="bad.xlsx: unreadable as xlsx"):
        convert_labels_file(tmp_path / "bad.xlsx", tmp_path / "o6", "graded-pairwise", "pairwise")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o6").exists()


def test_streaming_readers_recover_when_a_later_block_changes_type(tmp_path, monkeypatch):
    from alignflow.feedback.labels import io as lio

    monkeypatch.setattr(lio, "BLOCK_BYTES", 256)  # many small blocks
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "note": None} for i in range(40)]
    rows[30]["note"] = "now a string"  # Arrow inferred null from the first block
    write_jsonl(tmp_path / "s.jsonl", rows)
    batches = list(lio.iter_file_batches(tmp_path / "s.jsonl", batch_rows=7))
    got = [r for b in batches for r in b.select(["prompt", "note"]).to_pylist()]
    assert [r["prompt"] for r in got] == [f"p{i}" for i in range(40)] and got[30]["note"] == "now a string"
    lines = ["prompt,chosen,rejected,score"] + [f"p{i},c{i},r{i},{i}" for i in range(40)] + ["p40,c40,r40,high"]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    got = lio.read_file(tmp_path / "s.csv")
    assert got.num_rows == 41 and got.column("prompt").to_pylist()[-1] == "p40"
    assert [str(v) for v in got.column("score").to_pylist()][-2:] == ["39", "high"]


def test_parquet_is_streamed_in_batches(tmp_path):
    from alignflow.feedback.labels import io as lio

    pq.write_table(pa.table({"x": list(range(1000))}), tmp_path / "big.parquet", row_group_size=100)
    sizes = [b.num_rows for b in lio.iter_file_batches(tmp_path / "big.parquet", batch_rows=64)]
    assert sum(sizes) == 1000 and max(sizes) <= 64


def test_oasst_emojis_and_detoxify_are_kept_and_can_order_siblings(tmp_path):
    def detox(t):
        return {"toxicity": t, "insult": t / 2}

    rows = [{"message_id": "p", "parent_id": None, "role": "prompter", "text": "Q?", "rank": None,
             "emojis": {"name": ["+1"], "count": [1]}, "detoxify": detox(0.1)},
            {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "A", "rank": 0,
             "emojis": {"name": ["+1", "-1"], "count": [2, 5]}, "detoxify": detox(0.5)},
            {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "B", "rank": 1,
             "emojis": {"name": ["+1"], "count": [4]}, "detoxify": detox(0.25)},
            {"message_id": "c", "parent_id": "p", "role": "assistant", "text": "C", "rank": 2,
             "emojis": None, "detoxify": None}]
    report, table = convert(tmp_path, rows, "oasst", "listwise")
    assert table.column("response_emojis").to_pylist() == [[rows[1]["emojis"], rows[2]["emojis"], None]]
    assert table.column("prompt_emojis").to_pylist() == [rows[0]["emojis"]]
    assert table.column("response_detoxify").to_pylist() == [[detox(0.5), detox(0.25), None]]
    # thumbs up: A's +1 count 2 < B's 4; C got no reactions at all (emojis null), which is 0 thumbs up,
    # as B's 0 thumbs down below (issue #15 item 5: both used to differ, C was dropped)
    report, table = convert(tmp_path, rows, "oasst", "listwise", aspect="emoji:+1")
    assert table.column("responses").to_pylist() == [["B", "A", "C"]]
    assert table.column("scores").to_pylist() == [[4.0, 2.0, 0.0]] and not report.dropped and report.adds_up
    # -1 given to A only: B (other reactions) and C (none) have 0 of them
    report, table = convert(tmp_path, rows, "oasst", "listwise", aspect="emoji:-1=-1")
    assert table.column("responses").to_pylist() == [["B", "C", "A"]]
    assert table.column("scores").to_pylist() == [[0.0, 0.0, -5.0]]
    report, table = convert(tmp_path, rows, "oasst", "pairwise", aspect="detoxify:toxicity=-1")
    assert pairs_of(table) == [("B", "A")] and table.column("margin").to_pylist() == [0.25]
    with pytest.raises(LabelsError, match=r"--aspect mean is not meaningful for oasst.*emoji:\+1.*detoxify:toxicity"):
        convert(tmp_path, rows, "oasst", "listwise", aspect="mean")


def test_oasst_tree_export_emoji_dict_and_detoxify(tmp_path):
    tree = {"message_tree_id": "t1", "prompt": {
        "message_id": "m0", "role": "prompter", "text": "root?", "emojis": {"+1": 3},
        "replies": [{"message_id": "m1", "role": "assistant", "text": "x", "rank": 1, "emojis": {"+1": 1, "-1": 2},
                     "detoxify": {"toxicity": 0.5}},
                    {"message_id": "m2", "role": "assistant", "text": "y", "rank": 0, "emojis": {"+1": 6},
                     "detoxify": {"toxicity": 0.1}}]}}
    report, table = convert(tmp_path, [tree], "oasst", "listwise", name="tree.jsonl")
    assert table.column("response_emojis").to_pylist() == [[{"name": ["+1"], "count": [6]},
                                                            {"name": ["+1", "-1"], "count": [1, 2]}]]
    assert table.column("prompt_emojis").to_pylist() == [{"name": ["+1"], "count": [3]}]
    assert table.column("response_detoxify").to_pylist() == [[{"toxicity": 0.1}, {"toxicity": 0.5}]]
    report, table = convert(tmp_path, [tree], "oasst", "listwise", name="tree2.jsonl", aspect="detoxify:toxicity")
    assert table.column("responses").to_pylist() == [["x", "y"]]
    # flat rows may hold the dict form too (read by Arrow as a struct with a field per emoji)
    flat = [{"message_id": "m0", "parent_id": None, "role": "prompter", "text": "root?", "rank": None, "emojis": None},
            {"message_id": "m1", "parent_id": "m0", "role": "assistant", "text": "x", "rank": 1,
             "emojis": {"+1": 1, "-1": 2}},
            {"message_id": "m2", "parent_id": "m0", "role": "assistant", "text": "y", "rank": 0, "emojis": {"+1": 6}}]
    report, table = convert(tmp_path, flat, "oasst", "listwise", name="flat.jsonl", aspect="emoji:+1")
    assert table.column("responses").to_pylist() == [["y", "x"]] and table.column("scores").to_pylist() == [[6.0, 1.0]]
    assert table.column("response_emojis").to_pylist() == [[{"name": ["+1"], "count": [6]},
                                                            {"name": ["+1", "-1"], "count": [1, 2]}]]
