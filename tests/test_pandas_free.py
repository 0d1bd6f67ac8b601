"""prompt ids without pandas (SipHash-2-4 in numpy, the same numbers as pandas' hash_array), and
a conversion's process that never imports pandas unless a format uses it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.schemas.kinds import MESSAGES
from alignflow.schemas.prompts import canonical_prompt_text, messages, prompt_id, text_hashes
from alignflow.schemas.siphash import PANDAS_KEY, pandas_hash_mix, siphash24

LABELS = Path("/work/shared/data/human-labels")


def _random_texts(n: int, seed: int) -> list[str | None]:
    rng = random.Random(seed)
    alphabet = "ab \n\x1e\x1fé漢😀"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 70))) for _ in range(n)]
    # every length around the 8-byte blocks, and nulls, which pandas hashes as the text "None"
    return texts + ["x" * k for k in range(25)] + [None, "None", ""]


def test_numpy_siphash_gives_pandas_hash_array_values():
    texts = _random_texts(3000, seed=0)
    expected = pd.util.hash_array(np.array(texts, dtype=object), categorize=False).astype(np.uint64)
    assert np.array_equal(pandas_hash_mix(siphash24(pa.array(texts, pa.string()))), expected)
    # a slice (its offsets start inside the buffer) and large_string hash the same values
    sliced = pa.array(texts, pa.large_string()).slice(11, 500)
    assert np.array_equal(pandas_hash_mix(siphash24(sliced)), expected[11:511])
    assert len(siphash24(pa.array([], pa.string()))) == 0


def test_siphash_matches_the_reference_vectors():
    """SipHash-2-4's published test vectors (key 00..0f, messages 00, 00 01, ...): the first
    word of each 8 output bytes, little-endian."""
    key = bytes(range(16))
    vectors = {0: 0x726FDB47DD0E0E31, 1: 0x74F839C593DC67FD, 7: 0xAB0200F58B01D137, 8: 0x93F5F5799A932462,
               15: 0xA129CA6149BE45E5}
    texts = pa.array([bytes(range(n)) for n in vectors], pa.binary())
    assert siphash24(texts, key).tolist() == list(vectors.values())
    assert PANDAS_KEY == b"0123456789123456"


def test_prompt_ids_are_the_same_with_and_without_pandas():
    rng = random.Random(1)
    prompts = pa.array([messages(t or "") if rng.random() < 0.7 else
                        [{"role": "system", "content": t or ""}, {"role": "user", "content": "x"}]
                        for t in _random_texts(2000, seed=1)], MESSAGES)
    text = canonical_prompt_text(prompts)
    assert np.array_equal(text_hashes(text, via_pandas=False), text_hashes(text, via_pandas=True))
    assert prompt_id("hi") == "26def13bce0d619e"  # fixed forever: ids name data on disk


def _run_cli(args: list[str]) -> tuple[int, list[str], str]:
    """``alignflow ARGS`` in a fresh process (the entry point, so it owns the process):
    exit code, the modules of interest it imported, its output."""
    code = ("import json, runpy, sys\n"
            f"sys.argv = {['alignflow', *args]!r}\n"
            "rc = 0\n"
            "try:\n    runpy.run_module('alignflow.flows.cli', run_name='__main__')\n"
            "except SystemExit as exc:\n    rc = exc.code\n"
            "print(json.dumps({'rc': rc, 'loaded': [m for m in ('pandas', 'pydantic') if m in sys.modules]}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rc"], result["loaded"], proc.stdout + proc.stderr


@pytest.mark.skipif(not LABELS.is_dir(), reason="needs ../shared/data/human-labels")
def test_a_conversion_process_imports_pandas_only_for_a_format_that_uses_it(tmp_path):
    from alignflow.feedback.labels import convert_labels_file

    hh = LABELS / "hh-rlhf_harmless-base_test.jsonl.gz"
    rc, loaded, out = _run_cli(["convert", str(hh), str(tmp_path / "hh"), "--from", "hh-rlhf", "--to", "pairwise"])
    assert rc == 0 and "pandas" not in loaded, out
    # the prompt ids hashed without pandas are the ones this (pandas-loaded) process computes
    convert_labels_file(hh, tmp_path / "hh-here", "hh-rlhf", "pairwise")
    ours, here = (pq.read_table(tmp_path / d).column("prompt_id") for d in ("hh", "hh-here"))
    assert ours.equals(here)

    # OASST groups messages with pandas: the process imports it, and pyarrow then sees it
    oasst = LABELS / "oasst1_en_validation.jsonl"
    rc, loaded, out = _run_cli(["convert", str(oasst), str(tmp_path / "oasst"), "--from", "oasst", "--to", "listwise"])
    assert rc == 0 and "pandas" in loaded, out
    convert_labels_file(oasst, tmp_path / "oasst-here", "oasst", "listwise")
    assert pq.read_table(tmp_path / "oasst").equals(pq.read_table(tmp_path / "oasst-here"))


def test_hidden_pandas_comes_back_for_code_that_asks_and_for_pyarrow():
    code = """
import sys
import numpy as np
from alignflow.schemas.pandas_free import arrow_without_pandas, import_pandas
with arrow_without_pandas():
    import pyarrow as pa
    pa.array(np.zeros(3)).to_numpy(); pa.scalar(0)       # each would import pandas
    assert "pandas" not in sys.modules
    try:
        import pandas
    except ModuleNotFoundError as exc:
        assert "import_pandas" in str(exc)
    else:
        raise AssertionError("pandas was not hidden")
    pd = import_pandas()
    # pyarrow recognises pandas objects again: NaN in a Series is a null
    assert pa.array(pd.Series([1.0, float("nan")])).null_count == 1
import pandas  # after the block, as usual
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
