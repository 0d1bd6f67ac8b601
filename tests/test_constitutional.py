"""Constitutional AI: critique-revision rounds, outputs, provenance; principle-conditioned labels."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alignflow.feedback.constitutional import (
    critique_revise,
    critique_revise_dataset,
    critiques_to_pairwise,
    critiques_to_sft,
    load_constitution,
    principle_preferences,
)
from alignflow.schemas.generator import Generation
from alignflow.schemas.store import read_dataset, read_manifest, write_dataset
from alignflow.schemas.validate import validate


class Critic:
    """Critiques name the request they answer; revisions append a marker to the response."""

    name = "critic"

    def __init__(self):
        self.seen = []

    def generate(self, prompts, n=1, sampling=None):
        out = []
        for conv in prompts:
            self.seen.append(conv)
            ask = conv[-1]["content"]
            if ask.startswith("Rewrite"):
                current = conv[-4]["content"]  # the response under revision
                text = current + "+"
            else:
                text = f"critique of {conv[-2]['content']!r}"
            out.append([Generation(text, len(text))] * n)
        return out


def _sft_rows():
    return pa.table({"prompt": ["Reverse: abc", "Copy exactly: xy"], "response": ["cab", "xy"]})


def test_rounds_revise_the_current_response_under_sampled_principles():
    const = load_constitution()
    gen = Critic()
    trace = critique_revise(_sft_rows(), gen, const, rounds=3, seed=0)
    names = {p.name for p in const.principles}
    for row in trace.to_pylist():
        assert len(row["rounds"]) == 3 and all(r["principle"] in names for r in row["rounds"])
        assert row["final"] == row["response"] + "+++"
        # round k critiques the revision of round k-1
        assert row["rounds"][1]["critique"] == f"critique of {row['response'] + '+'!r}"
    by_name = {p.name: p for p in const.principles}
    first = trace.to_pylist()[0]["rounds"][0]["principle"]
    assert gen.seen[0][-1]["content"] == by_name[first].critique  # critique request of the sampled principle
    assert gen.seen[2][-1]["content"] == by_name[first].revision
    # seeded: same seed, same principles; the trace fits the critiques kind
    again = critique_revise(_sft_rows(), Critic(), const, rounds=3, seed=0)
    assert again["rounds"].to_pylist() == trace["rounds"].to_pylist()
    assert validate(trace.drop_columns(["final"]), "critiques").quarantined.num_rows == 0
    sft, pairs = critiques_to_sft(trace), critiques_to_pairwise(trace)
    assert sft["response"].to_pylist() == ["cab+++", "xy+++"]
    assert pairs["chosen"].to_pylist() == ["cab+++", "xy+++"] and pairs["rejected"].to_pylist() == ["cab", "xy"]


def test_dataset_outputs_carry_provenance(tmp_path):
    src = write_dataset(tmp_path / "in", _sft_rows(), "sft", {"flow": "test"})
    paths = critique_revise_dataset(src, tmp_path / "cai", Critic(), rounds=2, seed=1)
    assert set(paths) == {"critiques", "sft", "pairwise"}
    for kind, path in paths.items():
        m = read_manifest(path)
        assert m["kind"] == kind and m["num_rows"] == 2
        prov = m["provenance"]
        assert prov["constitution"]["sha256"] and prov["rounds"] == 2 and prov["seed"] == 1
        assert str(src) in prov["parent_datasets"]
    assert read_dataset(paths["sft"])["response"].to_pylist() == ["cab++", "xy++"]


def test_bad_constitution_files(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: x\n    critique: ''\n    revision: fix it\n")
    with pytest.raises(ValueError, match="principle 0: field 'critique'"):
        load_constitution(bad)
    bad.write_text("principles: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_constitution(bad)


def test_principle_conditioned_preferences():
    from alignflow.feedback.judges import PairwiseJudge

    class PrincipledJudge:
        name = "pj"

        def __init__(self):
            self.prompts = []

        def score(self, prompt, continuations):
            body = prompt[-1]["content"]
            self.prompts.append(body)
            first_short = body.index("<response_1>\nok\n") > 0 if "<response_1>\nok\n" in body else False
            p1 = 0.9 if first_short else 0.1  # prefers "ok" wherever it is
            return [float(np.log(p1)) if c == "1" else float(np.log1p(-p1)) for c in continuations]

    judge_gen = PrincipledJudge()
    cands = pa.table({"prompt_id": ["a", "b"], "prompt": ["q1", "q2"], "response_a": ["ok", "long rambling"],
                      "response_b": ["long rambling", "ok"]})
    const = load_constitution()
    table, result, counts = principle_preferences(cands, PairwiseJudge(judge_gen), const, seed=0)
    assert table["chosen"].to_pylist() == ["ok", "ok"] and counts["labelled"] == 2
    assert set(table["principle"].to_pylist()) <= {p.name for p in const.principles}
    prefs = {p.preference for p in const.principles}
    assert all(any(q in body for q in prefs) for body in judge_gen.prompts)  # criterion in the prompt
    assert "<principle>" in judge_gen.prompts[0]
