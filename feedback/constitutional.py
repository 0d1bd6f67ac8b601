"""Constitutional AI (survey 3.2.1): critique-revision to SFT data, and AI preference labels
conditioned on a principle (the RLAIF stage).

Critique-revision: for each (prompt, response) and each of ``rounds`` rounds, a principle is
sampled (seeded, per row and round), the model writes a critique of the current response under
that principle's critique request, then a revision under its revision request; the revision
becomes the current response. The conversation the model sees::

    user: <prompt>              assistant: <current response>
    user: <critique request>    assistant: <critique>          (generated)
    user: <revision request>    assistant: <revision>          (generated)

Each round is one batched ``generate`` call for all rows (critiques), then one for revisions.
Outputs: the ``critiques`` trace (original response, list of {principle, critique, revision}),
``sft`` (final revisions) and ``pairwise`` (final revision chosen over the original,
``source="ai"``), each a table; ``critique_revise_dataset`` writes all three with provenance.

``principle_preferences``: a ``PairwiseJudge`` labels candidate pairs with one sampled
principle's preference question as the judging criterion, per pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from alignflow.schemas.generator import SamplingParams
from alignflow.schemas.kinds import ROUND
from alignflow.schemas.prompts import to_messages_array

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitutions") / "default.yaml"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    preference: str = ""


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    source: str = ""
    sha256: str = ""

    def provenance(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "principles": [p.name for p in self.principles]}


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read a constitution YAML (``principles: [{name, critique, revision, preference?}]``)."""
    import yaml

    path = Path(path) if path else DEFAULT_CONSTITUTION
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
        raise ValueError(f"{path}: needs a non-empty 'principles' list")
    principles = []
    for i, p in enumerate(data["principles"]):
        if not isinstance(p, dict):
            raise ValueError(f"{path}: principle {i}: must be a mapping")
        for key in ("critique", "revision"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise ValueError(f"{path}: principle {i}: field {key!r} missing or empty")
        principles.append(Principle(str(p.get("name", f"principle-{i}")), p["critique"].strip(),
                                    p["revision"].strip(), str(p.get("preference", "") or "").strip()))
    return Constitution(str(data.get("name", path.stem)), tuple(principles), str(path), hashlib.sha256(raw).hexdigest())


def sample_principles(n_rows: int, rounds: int, n_principles: int, seed: int) -> np.ndarray:
    """Principle index per (row, round), seeded: [n_rows, rounds] int."""
    return np.random.default_rng(seed).integers(0, n_principles, size=(n_rows, rounds))


def _generate_texts(generator: Any, conversations: list[list[dict]], sampling: SamplingParams,
                    batch_size: int) -> list[str]:
    out = []
    for start in range(0, len(conversations), batch_size):
        s = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + start)
        out.extend(g[0].text.strip() for g in generator.generate(conversations[start: start + batch_size], 1, s))
    return out


def critique_revise(table: pa.Table, generator: Any, constitution: Constitution, rounds: int = 1, seed: int = 0,
                    sampling: SamplingParams | None = None, batch_size: int = 64,
                    progress: Callable[[int], None] | None = None, stats: dict | None = None) -> pa.Table:
    """``critiques`` table from rows with ``prompt`` and ``response`` (``samples`` or ``sft``).

    What the model reads fits its context (``feedback.context``): the prompt's turns and the
    current response keep their heads, in equal shares, where the whole revision conversation
    would not fit with room for a critique and a revision of ``max_new_tokens`` each; the rows
    cut are counted in ``stats["truncated"]``. The stored trace keeps the full texts."""
    from alignflow.feedback.context import fit_conversation, fitter_for
    from alignflow.schemas.prompts import normalize_prompt_columns

    table = normalize_prompt_columns(table)
    prompts = table.column("prompt").to_pylist()
    original = table.column("response").to_pylist()
    current = list(original)
    picks = sample_principles(len(prompts), rounds, len(constitution.principles), seed)
    sampling = sampling or SamplingParams(temperature=0.7, max_new_tokens=128, seed=seed)
    traces: list[list[dict]] = [[] for _ in prompts]
    fitter = fitter_for(generator, what="critique-revision prompt")
    for rnd in range(rounds):
        principles = [constitution.principles[k] for k in picks[:, rnd]]
        base = [fit_conversation(fitter, list(p) + [{"role": "assistant", "content": r}], 2 * sampling.max_new_tokens,
                                 tail=[{"role": "user", "content": pr.critique}, {"role": "assistant", "content": ""},
                                       {"role": "user", "content": pr.revision}])
                for p, r, pr in zip(prompts, current, principles)]
        ask_critique = [b + [{"role": "user", "content": pr.critique}] for b, pr in zip(base, principles)]
        step_seed = None if sampling.seed is None else sampling.seed + 2 * rnd * 1_000_003
        critiques = _generate_texts(generator, ask_critique, dataclasses.replace(sampling, seed=step_seed), batch_size)
        ask_revision = [c + [{"role": "assistant", "content": cr}, {"role": "user", "content": pr.revision}]
                        for c, cr, pr in zip(ask_critique, critiques, principles)]
        rev_seed = None if step_seed is None else step_seed + 1_000_003
        revisions = _generate_texts(generator, ask_revision, dataclasses.replace(sampling, seed=rev_seed), batch_size)
        for i, (pr, cr, rv) in enumerate(zip(principles, critiques, revisions)):
            traces[i].append({"principle": pr.name, "critique": cr, "revision": rv})
            if rv:  # an empty revision keeps the current response
                current[i] = rv
        if progress:
            progress(len(prompts))
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + fitter.truncated
    return pa.table({"prompt_id": table.column("prompt_id"), "prompt": to_messages_array(table.column("prompt")),
                     "response": pa.array(original, pa.string()),
                     "rounds": pa.array(traces, pa.list_(ROUND)),
                     "final": pa.array(current, pa.string())})


def critiques_to_sft(critiques: pa.Table) -> pa.Table:
    return pa.table({"prompt_id": critiques.column("prompt_id"), "prompt": critiques.column("prompt"),
                     "response": critiques.column("final")})


def critiques_to_pairwise(critiques: pa.Table) -> pa.Table:
    """Final revision over the original; rows where nothing changed are dropped."""
    import pyarrow.compute as pc

    keep = pc.not_equal(critiques.column("final"), critiques.column("response"))
    t = critiques.filter(keep)
    return pa.table({"prompt_id": t.column("prompt_id"), "prompt": t.column("prompt"),
                     "chosen": t.column("final"), "rejected": t.column("response"),
                     "margin": pa.nulls(t.num_rows, pa.float64()),
                     "source": pa.array(["ai"] * t.num_rows, pa.string())})


def critique_revise_dataset(in_path: str | Path, out_dir: str | Path, generator: Any,
                            constitution: Constitution | None = None, rounds: int = 1, seed: int = 0,
                            sampling: SamplingParams | None = None, *, batch_size: int = 64,
                            overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Path]:
    """Writes ``critiques``, ``sft`` and ``pairwise`` datasets under ``out_dir``; returns their paths."""
    from alignflow.feedback.sampling import generator_provenance
    from alignflow.schemas.store import read_dataset, write_dataset

    constitution = constitution or load_constitution()
    sampling = sampling or SamplingParams(temperature=0.7, max_new_tokens=128, seed=seed)
    stats: dict = {}
    trace = critique_revise(read_dataset(in_path), generator, constitution, rounds, seed, sampling,
                            batch_size, progress, stats=stats)
    out_dir = Path(out_dir)
    prov = {"flow": "critique", "models": {"critic": generator_provenance(generator)},
            "constitution": constitution.provenance(), "rounds": rounds, "seed": seed,
            "sampling": dataclasses.asdict(sampling), "parent_datasets": [str(in_path)],
            "truncated_to_context": stats.get("truncated", 0)}
    paths = {"critiques": write_dataset(out_dir / "critiques", trace.drop_columns(["final"]), "critiques", prov,
                                        overwrite=overwrite)}
    child = dict(prov, parent_datasets=[str(in_path), str(paths["critiques"])])
    paths["sft"] = write_dataset(out_dir / "sft", critiques_to_sft(trace), "sft", child, overwrite=overwrite)
    paths["pairwise"] = write_dataset(out_dir / "pairwise", critiques_to_pairwise(trace), "pairwise", child,
                                      overwrite=overwrite)
    return paths


def principle_preferences(candidates: pa.Table, judge: Any, constitution: Constitution, seed: int = 0):
    """RLAIF stage: label candidate pairs (``response_a``/``response_b``) with a ``PairwiseJudge``,
    each pair judged under one sampled principle's preference question (or its critique request
    when it has none). Returns (pairwise table with a ``principle`` column, judgement, counts)."""
    from alignflow.feedback.judges.tables import label_pairs

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(constitution.principles), size=candidates.num_rows)
    principles = [constitution.principles[k] for k in picks]
    criteria = [p.preference or p.critique for p in principles]
    table, result, counts = label_pairs(candidates, judge, criteria=criteria)
    names = np.array([p.name for p in principles], dtype=object)[~result.tie]
    return table.append_column("principle", pa.array(names.tolist(), pa.string())), result, counts
