"""The toy world's synthetic instruction task and its programmatic reward.

Default task: write a number 0..999 in English words (one user turn, one short answer)::

    "Spell out: 42"   ->  "forty-two"
    "Spell out: 305"  ->  "three hundred five"

String transformations of a random lowercase word are available as further operations
("Write in capitals: ", "Copy exactly: ", "Reverse: "); a 2-layer char model learns them much
more slowly (they need copying from the prompt), so they are off by default.

Reward (in [0, 1]) with partial credit and a length knob ``length_weight`` = w::

    quality(y, y*) = (# positions i with y[i] == y*[i]) / max(len(y), len(y*))
    length_bonus(y) = clip((len(y) - len(y*) / 2) / len(y*), 0, 1)   (0.5 at the answer's length)
    reward = (1 - w) * quality + w * length_bonus

(``y`` is the response with surrounding whitespace stripped, ``y*`` the reference.)
With ``w = 0`` (the default) only correctness counts and extra characters lower the score
(the denominator grows). With ``w > 0`` longer answers earn more even when they are wrong
(for a half-right answer one extra character gains from about ``w > 1/3``, for a right one
from ``w > 1/2``; on the toy world's samples the longer of two differing samples wins ~50%
of pairs at w = 0 and clearly more as w grows):
a length-biased reward of the kind that length-controlled methods (R-DPO eq. 46, SimPO eq. 47)
are meant to resist. ``quality`` alone is the length-free "true" score to report next to it.

SFT data are deliberately of mixed quality: the response is the reference with a random share
of its characters replaced, sometimes padded with extra characters ("verbose") or cut short.
A model fitted to these samples knows the answer (greedy decoding is mostly right) but at
temperature 1 produces well-formed answers of mixed reward, so K samples of one prompt differ
and preference pairs exist.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LETTERS = string.ascii_lowercase

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell_number(n: int) -> str:
    """English words of 0 <= n < 1000, e.g. 42 -> "forty-two", 305 -> "three hundred five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"spell_number needs 0 <= n < 1000, got {n}")
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + (" " + spell_number(rest) if rest else "")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("-" + _ONES[ones] if ones else "")


# Instruction text -> transformation of the argument. The argument of "Spell out: " is a number.
OPERATIONS: dict[str, callable] = {
    "Spell out: ": lambda arg: spell_number(int(arg)),
    "Write in capitals: ": str.upper,
    "Copy exactly: ": lambda w: w,
    "Reverse: ": lambda w: w[::-1],
}


@dataclass(frozen=True)
class ToyTask:
    """A seeded string-transformation task with a partial-credit reward in [0, 1].

    Args:
        length_weight: w in ``reward = (1 - w) * quality + w * length_bonus`` (0 = length-neutral).
        min_len, max_len: word length range (inclusive) of the string operations.
        max_number: "Spell out" numbers are drawn uniformly from 0..max_number (at most 999).
        operations: which instruction prefixes of ``OPERATIONS`` are used.
        corruption_levels: SFT responses replace this share of characters (one level drawn
            uniformly per example); 0 gives a correct answer.
        p_verbose: chance an SFT response gets 1..``max_extra`` extra random characters.
        p_truncate: chance an SFT response loses 1..2 final characters.
    """

    length_weight: float = 0.0
    min_len: int = 3
    max_len: int = 7
    operations: tuple[str, ...] = ("Spell out: ",)
    corruption_levels: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    p_verbose: float = 0.25
    p_truncate: float = 0.1
    max_extra: int = 6
    max_number: int = 999

    def __post_init__(self) -> None:
        if not 0.0 <= self.length_weight <= 1.0:
            raise ValueError(f"length_weight must lie in [0, 1], got {self.length_weight}")
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown:
            raise ValueError(f"unknown operations {unknown}; known: {list(OPERATIONS)}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("need 1 <= min_len <= max_len")
        if not 0 <= self.max_number <= 999:
            raise ValueError(f"max_number must lie in 0..999, got {self.max_number}")

    # -- prompts and answers -------------------------------------------------------------
    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` prompts (plain text, one user turn each), a pure function of ``seed``."""
        rng = random.Random(f"toy-prompts-{seed}")
        return [self._prompt(rng) for _ in range(n)]

    def _prompt(self, rng: random.Random) -> str:
        op = rng.choice(self.operations)
        if op == "Spell out: ":
            return op + str(rng.randrange(self.max_number + 1))
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(self.min_len, self.max_len)))
        return op + word

    @staticmethod
    def parse(prompt: str) -> tuple[str, str]:
        """(operation prefix, word) of a prompt; ValueError for a prompt of another task."""
        for op in OPERATIONS:
            if prompt.startswith(op):
                return op, prompt[len(op):]
        raise ValueError(f"not a toy-task prompt: {prompt[:60]!r}")

    def reference(self, prompt: str) -> str:
        """The correct answer."""
        op, word = self.parse(prompt)
        return OPERATIONS[op](word)

    # -- reward --------------------------------------------------------------------------
    def quality(self, prompt: str, response: str) -> float:
        """Share of positions matching the reference, over the longer of the two lengths."""
        ref = self.reference(prompt)
        response = response.strip()
        denom = max(len(ref), len(response))
        if denom == 0:
            return 1.0
        return sum(a == b for a, b in zip(response, ref)) / denom

    def length_bonus(self, prompt: str, response: str) -> float:
        """clip((len(y) - len(y*) / 2) / len(y*), 0, 1): 0 up to half the answer's length, 0.5 at
        its length, 1 from one and a half times its length on."""
        n_ref = len(self.reference(prompt))
        if n_ref == 0:
            return 1.0
        return min(max((len(response.strip()) - n_ref / 2) / n_ref, 0.0), 1.0)

    def reward(self, prompt: str, response: str) -> float:
        """``(1 - w) * quality + w * length_bonus`` in [0, 1]."""
        w = self.length_weight
        score = (1.0 - w) * self.quality(prompt, response)
        if w:
            score += w * self.length_bonus(prompt, response)
        return float(score)

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Vectorised form of ``reward`` over aligned lists; float64 array of shape [N]."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return np.fromiter((self.reward(p, r) for p, r in zip(prompts, responses)),
                           dtype=np.float64, count=len(prompts))

    def qualities(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Length-free ``quality`` over aligned lists; float64 array of shape [N]."""
        return np.fromiter((self.quality(p, r) for p, r in zip(prompts, responses)),
                           dtype=np.float64, count=len(prompts))

    # -- SFT data of mixed quality -------------------------------------------------------
    def corrupt(self, answer: str, rng: random.Random) -> str:
        """A plausible but imperfect answer: some characters replaced, maybe padded or cut."""
        level = rng.choice(self.corruption_levels)
        alphabet = string.ascii_uppercase if answer.isupper() else LETTERS + "-" * ("-" in answer)
        chars = [rng.choice(alphabet) if rng.random() < level else c for c in answer]
        if rng.random() < self.p_verbose:
            chars += [rng.choice(alphabet) for _ in range(rng.randint(1, self.max_extra))]
        elif rng.random() < self.p_truncate and len(chars) > 2:
            chars = chars[: len(chars) - rng.randint(1, 2)]
        return "".join(chars)

    def sft_examples(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` (prompt, response) pairs; responses are corrupted references (mixed quality)."""
        rng = random.Random(f"toy-sft-{seed}")
        examples = []
        for _ in range(n):
            prompt = self._prompt(rng)
            examples.append((prompt, self.corrupt(self.reference(prompt), rng)))
        return examples

    def config(self) -> dict:
        """JSON-able parameters (for provenance and cache keys)."""
        from dataclasses import asdict

        return asdict(self)
