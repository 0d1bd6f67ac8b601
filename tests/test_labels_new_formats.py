"""Formats of fine-tuning frameworks and AI-feedback tools (issue #15), on rows taken from those
projects' own public files (``tests/public_rows.py`` names each source), and the defects a new
user met with them: a message dict read as text, a run that converted nothing exiting 0, the
OASST message export, multi-turn arena battles, sources, Argilla's question columns."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignflow.feedback.labels import FORMATS, LabelsError, Options, convert_labels_file
from alignflow.flows.cli import app
from alignflow.schemas.store import read_dataset
from tests.public_rows import (
    ARGILLA_V2_FLAT,
    AXOLOTL_ARGILLA_CHAT,
    AXOLOTL_ASSISTANT,
    AXOLOTL_CUSTOM,
    DISTILABEL_ULTRAFEEDBACK,
    DPO_EN_DEMO,
    KTO_EN_DEMO,
    OASST_README_TREE,
    PROMETHEUS_ABSOLUTE,
    PROMETHEUS_RELATIVE,
    V1_DPO_DEMO_2,
)

runner = CliRunner()


def write_rows(path, rows):
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def convert(tmp_path, rows, fmt, to="pairwise", name="in.jsonl", **options):
    src = write_rows(tmp_path / name, rows)
    out = tmp_path / f"out-{fmt}-{to}-{name}".replace(".", "_")  # a folder: a name with no file extension
    report = convert_labels_file(src, out, fmt, to, Options(**options))
    assert report.adds_up
    return report, read_dataset(out)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# -- LLaMA-Factory ----------------------------------------------------------------------------


def test_llamafactory_sharegpt_ranking_keeps_system_and_earlier_turns(tmp_path):
    rows = [DPO_EN_DEMO[134], DPO_EN_DEMO[23], DPO_EN_DEMO[172]]
    report, table = convert(tmp_path, rows, "llamafactory", name="dpo_en_demo.json")
    assert (report.read, report.written) == (3, 3)
    got = table.to_pylist()
    conv = DPO_EN_DEMO[172]["conversations"]
    assert got[2]["prompt"] == [user(conv[0]["value"]), assistant(conv[1]["value"]), user(conv[2]["value"]),
                                assistant(conv[3]["value"]), user(conv[4]["value"])]
    assert got[1]["prompt"] == [system(DPO_EN_DEMO[23]["conversations"][0]["value"]),
                                user(DPO_EN_DEMO[23]["conversations"][1]["value"])]
    for row, src in zip(got, rows):
        assert (row["chosen"], row["rejected"]) == (src["chosen"]["value"], src["rejected"]["value"])
    assert {r["source"] for r in got} == {None}  # LLaMA-Factory files do not say who labelled them


def test_llamafactory_sharegpt_read_as_trl_is_an_error_not_json_text(tmp_path):
    """Issue #15 item 1: ``--from trl-preference`` on dpo_en_demo.json exited 0 with prompts like
    ``{"from": "gpt", "value": "`` (the dicts' shared beginning). Now: exit 2, one line naming
    file, row and field, and the format to use."""
    src = write_rows(tmp_path / "dpo_en_demo.json", [DPO_EN_DEMO[134], DPO_EN_DEMO[23], DPO_EN_DEMO[172]])
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--from", "trl-preference", "--to",
                                 "pairwise"], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert ("dpo_en_demo.json: row 0: field 'chosen': expected text or a list of {role, content} messages, got an "
            "object {from, value} (a message); the file's columns look like llamafactory: try --from llamafactory"
            ) in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_llamafactory_v1_pairs(tmp_path):
    _, table = convert(tmp_path, [V1_DPO_DEMO_2], "llamafactory", name="v1.jsonl")
    row = table.to_pylist()[0]
    msgs = V1_DPO_DEMO_2["chosen_messages"]
    assert row["prompt"] == [system(msgs[0]["content"][0]["value"]), user(msgs[1]["content"][0]["value"])]
    assert row["chosen"] == msgs[2]["content"][0]["value"]
    assert row["rejected"] == V1_DPO_DEMO_2["rejected_messages"][2]["content"][0]["value"]


def test_llamafactory_alpaca_ranking_with_history_and_dataset_info_columns(tmp_path):
    # The alpaca ranking shape of data/README.md (instruction, input, chosen, rejected, system,
    # history); content: the v1 demo row above. dataset_info.json's orca_pairs entry maps
    # prompt=question, system=system: --fields does the same.
    msgs = V1_DPO_DEMO_2["chosen_messages"]
    sys_text, question = msgs[0]["content"][0]["value"], msgs[1]["content"][0]["value"]
    chosen, rejected = msgs[2]["content"][0]["value"], V1_DPO_DEMO_2["rejected_messages"][2]["content"][0]["value"]
    alpaca = [{"instruction": "Concepts: fall, love", "input": "relationship, thing", "chosen": chosen,
               "rejected": rejected, "system": sys_text, "history": [["hi", "hello"]]}]
    _, table = convert(tmp_path, alpaca, "llamafactory", name="alpaca.jsonl")
    assert table.column("prompt").to_pylist()[0] == [system(sys_text), user("hi"), assistant("hello"),
                                                     user("Concepts: fall, love\nrelationship, thing")]
    orca = [{"system": sys_text, "question": question, "chosen": chosen, "rejected": rejected}]
    _, table = convert(tmp_path, orca, "llamafactory", name="orca.jsonl", fields="prompt=question")
    assert table.column("prompt").to_pylist()[0] == [system(sys_text), user(question)]
    with pytest.raises(LabelsError, match=r"--fields: nope not known to llamafactory"):
        convert(tmp_path, orca, "llamafactory", name="orca2.jsonl", fields="nope=x")


def test_llamafactory_kto(tmp_path):
    rows = [KTO_EN_DEMO[147], KTO_EN_DEMO[119]]
    _, table = convert(tmp_path, rows, "llamafactory-kto", to="binary", name="kto_en_demo.json")
    got = table.to_pylist()
    assert [r["label"] for r in got] == [True, False]
    assert [r["prompt"] for r in got] == [[user(r["messages"][0]["content"])] for r in rows]
    assert [r["response"] for r in got] == [r["messages"][1]["content"] for r in rows]


# -- axolotl ----------------------------------------------------------------------------------


def test_axolotl_chat_template_default_and_its_field_options(tmp_path):
    _, table = convert(tmp_path, [AXOLOTL_ASSISTANT], "axolotl-chat_template")
    row = table.to_pylist()[0]
    assert row["prompt"] == AXOLOTL_ASSISTANT["messages"] and (row["chosen"], row["rejected"]) == ("goodbye", "party on")
    fields = "field_messages=conversation,field_chosen=better,field_rejected=worse,role=speaker,content=text," \
             "roles.user=human,roles.assistant=agent"
    _, table = convert(tmp_path, [AXOLOTL_CUSTOM], "axolotl-chat_template", name="custom.jsonl", fields=fields)
    assert table.to_pylist()[0]["prompt"] == AXOLOTL_ASSISTANT["messages"]
    # chosen / rejected as whole conversations (argilla_chat): the answer is their last message
    rows = [dict(messages=[user("hello")], **AXOLOTL_ARGILLA_CHAT)]
    _, table = convert(tmp_path, rows, "axolotl-chat_template", name="lists.jsonl")
    assert (table.column("chosen")[0].as_py(), table.column("rejected")[0].as_py()) == ("goodbye", "party on")


def test_axolotl_chat_template_read_as_trl_is_an_error(tmp_path):
    src = write_rows(tmp_path / "ax.jsonl", [AXOLOTL_ASSISTANT])
    with pytest.raises(LabelsError, match=r"row 0: field 'chosen': expected text or a list of \{role, content\} "
                                          r"messages, got an object \{role, content\}.*try --from axolotl-chat_template"):
        convert_labels_file(src, tmp_path / "o", "trl-preference", "pairwise")


def _orca_rows():
    """Intel/orca_dpo_pairs' columns (system, question, chosen, rejected: axolotl chatml.intel);
    content from LLaMA-Factory's v1 demo row, which holds orca_dpo_pairs data."""
    msgs = V1_DPO_DEMO_2["chosen_messages"]
    return [{"system": msgs[0]["content"][0]["value"], "question": msgs[1]["content"][0]["value"],
             "chosen": msgs[2]["content"][0]["value"],
             "rejected": V1_DPO_DEMO_2["rejected_messages"][2]["content"][0]["value"]}] * 10


def test_chatml_intel_through_trl_preference_fails_and_names_the_format(tmp_path):
    """Issue #15 item 2: 10 of 10 quarantined, exit 0, no hint. Now: exit 2 with the reason, the
    columns seen and the format to use; nothing is written."""
    src = write_rows(tmp_path / "intel.jsonl", _orca_rows())
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--from", "trl-preference", "--to",
                                 "pairwise"], terminal_width=500)
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line and "nothing written as trl-preference -> pairwise" in line
    assert "all 10 records were refused (10 implicit prompt: no shared beginning)" in line
    assert "columns seen: system (text), question (text), chosen (text), rejected (text)" in line
    assert line.endswith("try --from axolotl-chatml.intel") and not (tmp_path / "out").exists()


def test_axolotl_chatml_types(tmp_path):
    rows = _orca_rows()[:1]
    _, table = convert(tmp_path, rows, "axolotl-chatml.intel", name="intel.jsonl")
    assert table.to_pylist()[0]["prompt"] == [system(rows[0]["system"]), user(rows[0]["question"])]
    # chatml.argilla and chatml.ultra shapes (docs/rlhf.qmd), content from dpo_en_demo.json row 134
    src = DPO_EN_DEMO[134]
    q, c, r = src["conversations"][0]["value"], src["chosen"]["value"], src["rejected"]["value"]
    _, table = convert(tmp_path, [{"instruction": q, "chosen_response": c, "rejected_response": r}],
                       "axolotl-chatml.argilla", name="argilla.jsonl")
    assert table.to_pylist()[0]["prompt"] == [user(q)] and table.column("chosen")[0].as_py() == c
    ultra = [{"prompt": q, "chosen": [user(q), assistant(c)], "rejected": [user(q), assistant(r)]}]
    _, table = convert(tmp_path, ultra, "axolotl-chatml.ultra", name="ultra.jsonl")
    assert (table.column("chosen")[0].as_py(), table.column("rejected")[0].as_py()) == (c, r)


# -- ShareGPT ---------------------------------------------------------------------------------


def test_sharegpt_preference_answers_as_message_text_or_list(tmp_path):
    src = DPO_EN_DEMO[172]
    conv, c, r = src["conversations"], src["chosen"]["value"], src["rejected"]["value"]
    files = {"message": [src], "text": [{"conversations": conv, "chosen": c, "rejected": r}],
             "lists": [{"conversations": conv, "chosen": conv + [{"from": "gpt", "value": c}],  # whole conversations
                        "rejected": conv + [{"from": "gpt", "value": r}]},
                       {"conversations": conv, "chosen": [{"from": "gpt", "value": c}],  # the answer alone
                        "rejected": conv[:1] + [{"from": "gpt", "value": r}]}]}  # another conversation's
    for name, rows in files.items():
        report, table = convert(tmp_path, rows, "sharegpt", name=f"{name}.json")
        assert table.num_rows == 1 and table.column("chosen")[0].as_py() == c
        assert [m["role"] for m in table.column("prompt")[0].as_py()] == ["user", "assistant"] * 2 + ["user"]
    assert report.quarantine_reasons == {"rejected continues another conversation than the prompt": 1}
    # one file mixing the forms: chosen is text in one row and a message in another, never JSON text
    src_file = write_rows(tmp_path / "mixed.json", files["message"] + files["text"])
    with pytest.raises(LabelsError, match=r"mixed.json: row 0: field 'chosen': expected text, got an object or a list"):
        convert_labels_file(src_file, tmp_path / "mixed", "sharegpt", "pairwise")


# -- distilabel -------------------------------------------------------------------------------


def test_distilabel_ultrafeedback(tmp_path):
    report, table = convert(tmp_path, DISTILABEL_ULTRAFEEDBACK, "distilabel-ultrafeedback", to="listwise")
    # the third row's ratings were not parsed (None): no rated response left, dropped by rule
    assert (report.read, report.written) == (3, 2) and report.dropped == {"fewer than two rated responses": 1}
    assert table.column("responses").to_pylist() == [["A", "B"], ["4", "and a car"]]
    assert table.column("scores").to_pylist() == [[1.0, 2.0], [1.0, 2.0]]
    _, pairs = convert(tmp_path, DISTILABEL_ULTRAFEEDBACK, "distilabel-ultrafeedback", name="p.jsonl")
    assert pairs.column("chosen").to_pylist() == ["B", "and a car"]
    assert set(pairs.column("source").to_pylist()) == {"ai"}  # an AI judge's ratings


def test_distilabel_prometheus_relative_and_absolute(tmp_path):
    report, table = convert(tmp_path, PROMETHEUS_RELATIVE, "distilabel-prometheus")
    assert report.quarantine_reasons == {"result not A or B (the judge's answer was not parsed)": 1}
    assert [(r["chosen"], r["rejected"]) for r in table.to_pylist()] == [("B", "C"), ("C", "B")]
    report, table = convert(tmp_path, PROMETHEUS_ABSOLUTE, "distilabel-prometheus", to="listwise", name="abs.jsonl")
    assert report.quarantined == 1 and table.column("responses").to_pylist() == [["B", "C"]]
    assert table.column("scores").to_pylist() == [[1.0, 5.0]]  # each generation's own score, grouped by instruction


# -- Argilla v2 -------------------------------------------------------------------------------


def test_argilla_v2_flat_export_counts_submitted_answers_only(tmp_path):
    # test_generic.py's record, its question values as ratings (two records rating two responses)
    a = dict(ARGILLA_V2_FLAT, prompt="P", response="first", **{"q2.responses": [4, 1]})  # 1 is a draft
    b = dict(ARGILLA_V2_FLAT, id="b", prompt="P", response="second", **{"q2.responses": [2, 5]})  # 5 is a draft
    _, table = convert(tmp_path, [a, b], "argilla", to="listwise", aspect="q2")
    assert table.column("responses").to_pylist() == [["first", "second"]]
    assert table.column("scores").to_pylist() == [[4.0, 2.0]]  # drafts left out (with them: 2.5 and 3.5)


def test_argilla_v2_nested_export_and_ranking(tmp_path):
    nested = [{"id": "r1", "status": "completed", "fields": {"prompt": "P", "response-1": "x", "response-2": "y"},
               "metadata": {}, "suggestions": {},
               "responses": {"ranking": [{"value": ["response-2", "response-1"], "user_id": "u1", "status": "submitted"},
                                         {"value": ["response-1", "response-2"], "user_id": "u2", "status": "draft"}]},
               "vectors": {}, "_server_id": None}]
    _, table = convert(tmp_path, nested, "argilla", to="pairwise", name="records.json")
    assert table.to_pylist()[0]["chosen"] == "y" and table.to_pylist()[0]["rejected"] == "x"


def test_argilla_without_question_lists_the_columns_it_has(tmp_path):
    """Issue #15 item 5: the error named a ``rating`` column the file lacks."""
    rows = [{"prompt": "P", "response": "a", "score": 3}]
    with pytest.raises(LabelsError) as err:
        convert(tmp_path, rows, "argilla")
    text = str(err.value)
    assert "'rating'" not in text and "the file has: prompt, response, score" in text
    assert "<question>.responses" in text


# -- OASST message export, arena multi-turn, sources ------------------------------------------


def test_oasst_message_export_with_nested_replies(tmp_path):
    """Issue #15 item 3: one root message per line, replies nested, no tree wrapper: 0 rows before."""
    root = json.loads(json.dumps(OASST_README_TREE["prompt"]))  # the README example, ranks added
    for rank, reply in enumerate(root["replies"]):
        reply["rank"] = rank
    for rank, reply in enumerate(root["replies"][1]["replies"][0]["replies"]):
        reply["rank"] = rank
    report, table = convert(tmp_path, [root], "oasst", to="listwise", name="2023-04-12_oasst_ready.messages.jsonl")
    # 10 messages: the unranked replies of one prompter turn and that turn are dropped by rule
    assert (report.read, report.written, report.quarantined) == (10, 7, 0) and report.adds_up
    assert report.dropped == {"unranked reply": 2, "prompter turn without ranked replies": 1}
    got = {r["prompt"][-1]["content"]: r["responses"] for r in table.to_pylist()}
    assert got == {"Why can't we divide by 0? (..)": ["The reason we cannot divide by zero is because (..)",
                                                      "The reason that the result of a division by zero is (..)"],
                   "Math is confusing. Like those weird Irrational (..)": [
                       "Irrational numbers are simply numbers (..)", "Irrational numbers can be confusing (..)",
                       "Irrational numbers are real numbers (..)"]}


def _battle():
    # the shape of lmsys/chatbot_arena_conversations (winner, conversation_a/b of {role, content});
    # its second turn's answers differ as every multi-turn battle's do
    a = [user("Hi"), assistant("Hello from A"), user("A joke?"), assistant("A pun.")]
    b = [user("Hi"), assistant("Hello from B"), user("A joke?"), assistant("No.")]
    return [{"winner": "model_b", "conversation_a": a, "conversation_b": b},
            {"winner": "model_a", "conversation_a": a[:2], "conversation_b": b[:2]}]


def test_arena_multi_turn_battles_as_whole_conversation_pairs(tmp_path):
    """Issue #15 item 4: multi-turn battles were all quarantined, with no way to keep them."""
    report, table = convert(tmp_path, _battle(), "arena")
    assert report.quarantine_reasons == {"conversations differ before the final answer (--multi-turn whole keeps them)": 1}
    report, table = convert(tmp_path, _battle(), "arena", name="whole.jsonl", multi_turn="whole")
    assert (report.written, report.quarantined) == (2, 0)
    whole, single = table.to_pylist()
    assert whole["prompt"] == [user("Hi")] and whole["whole_conversation"] and not single["whole_conversation"]
    assert whole["chosen"] == "Hello from B\n\nHuman: A joke?\n\nAssistant: No."
    assert whole["rejected"] == "Hello from A\n\nHuman: A joke?\n\nAssistant: A pun."
    assert (single["chosen"], single["rejected"]) == ("Hello from A", "Hello from B")


def test_sources_are_right_or_unknown(tmp_path):
    """Issue #15 item 5: trl-preference data (often UltraFeedback-derived) got source=human."""
    rows = [{"prompt": "How much is 2+2?", "chosen": "4", "rejected": "and a car"}]
    _, table = convert(tmp_path, rows, "trl-preference")
    assert table.column("source").to_pylist() == [None]
    uf = [{"instruction": "I", "completions": [
        {"response": r, "annotations": {"helpfulness": {"Rating": str(s)}}} for r, s in (("a", 5), ("b", 2))]}]
    _, table = convert(tmp_path, uf, "ultrafeedback", name="uf.jsonl", aspect="helpfulness")
    assert table.column("source").to_pylist() == ["ai"]


# -- exporters and the format list ------------------------------------------------------------


@pytest.mark.parametrize("fmt,options", [("llamafactory", {}), ("llamafactory", {"style": "alpaca"}),
                                         ("llamafactory", {"style": "v1"}), ("sharegpt", {}),
                                         ("axolotl-chat_template", {}), ("axolotl-chatml.intel", {}),
                                         ("axolotl-chatml.argilla", {}), ("axolotl-chatml.ultra", {}),
                                         ("distilabel-prometheus", {})])
def test_pairwise_exports_read_back_the_same(tmp_path, fmt, options):
    rows = [{"prompt": [system("Be brief."), user("2+2?")], "chosen": "4", "rejected": "5"},
            {"prompt": [user("Capital of France?")], "chosen": "Paris", "rejected": "Rome"}]
    if fmt in ("llamafactory", "sharegpt", "axolotl-chat_template") and not options:
        rows.append({"prompt": [user("a"), assistant("b"), user("c")], "chosen": "d", "rejected": "e"})
    if fmt == "distilabel-prometheus":  # its instruction holds one user turn, no system prompt
        rows = rows[1:]
    src = write_rows(tmp_path / "pairs.jsonl", rows)
    convert_labels_file(src, tmp_path / "canon", "pairwise", "pairwise")
    out = tmp_path / f"export.{'jsonl' if fmt != 'llamafactory' else 'json'}"
    convert_labels_file(tmp_path / "canon", out, "pairwise", fmt, Options(**options))
    convert_labels_file(out, tmp_path / "back", fmt, "pairwise")
    back = read_dataset(tmp_path / "back").select(["prompt", "chosen", "rejected"]).to_pylist()
    assert back == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def test_kto_and_ultrafeedback_exports_read_back(tmp_path):
    rows = [{"prompt": [user("q")], "response": "good", "label": True}, {"prompt": [user("q")], "response": "bad",
                                                                        "label": False}]
    convert_labels_file(write_rows(tmp_path / "b.jsonl", rows), tmp_path / "bin", "binary", "binary")
    convert_labels_file(tmp_path / "bin", tmp_path / "kto.json", "binary", "llamafactory-kto")
    convert_labels_file(tmp_path / "kto.json", tmp_path / "kback", "llamafactory-kto", "binary")
    assert read_dataset(tmp_path / "kback").select(["prompt", "response", "label"]).to_pylist() == rows
    lw = [{"prompt": [user("q")], "responses": ["x", "y", "z"], "scores": [3.0, 1.0, 2.0]}]
    convert_labels_file(write_rows(tmp_path / "l.jsonl", lw), tmp_path / "lw", "listwise", "listwise")
    convert_labels_file(tmp_path / "lw", tmp_path / "uf.jsonl", "listwise", "distilabel-ultrafeedback")
    assert json.loads((tmp_path / "uf.jsonl").read_text()) == {"instruction": "q", "generations": ["x", "y", "z"],
                                                               "ratings": [3.0, 1.0, 2.0]}


def test_single_turn_exports_refuse_multi_turn_prompts(tmp_path):
    rows = [{"prompt": [user("a"), assistant("b"), user("c")], "chosen": "d", "rejected": "e"}]
    convert_labels_file(write_rows(tmp_path / "p.jsonl", rows), tmp_path / "canon", "pairwise", "pairwise")
    with pytest.raises(LabelsError, match=r"row 0: .*one user turn.*3 turns: export to llamafactory"):
        convert_labels_file(tmp_path / "canon", tmp_path / "x.jsonl", "pairwise", "axolotl-chatml.intel")
    assert not (tmp_path / "x.jsonl").exists()


def test_formats_lists_the_new_formats(monkeypatch):
    from alignflow.flows.commands.common import console

    monkeypatch.setattr(console, "width", 300)  # names are not folded
    result = runner.invoke(app, ["formats"])
    assert result.exit_code == 0
    for name in ("llamafactory", "llamafactory-kto", "axolotl-chatml.intel", "axolotl-chatml.argilla",
                 "axolotl-chatml.ultra", "axolotl-chat_template", "sharegpt", "distilabel-ultrafeedback",
                 "distilabel-prometheus"):
        assert name in result.output and name in FORMATS
