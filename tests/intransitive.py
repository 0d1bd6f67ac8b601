"""An intransitive toy game for Nash learning (survey 3.13): rock-paper-scissors over three
response styles, where no reward can rank the styles.

A tiny char-level Llama answers every prompt ("Play round 7") with one of the styles ``A``,
``B``, ``C``; it is fitted to a skewed start distribution (default 0.6 / 0.3 / 0.1). The
preference is cyclic, ``B > A``, ``C > B``, ``A > C`` (P = 1 for the winner, 1/2 between equal
styles; any other text loses to every style). The unique Nash equilibrium is the uniform mix.

Measured exactly (no sampling) from the policy's log-probs of the three answers:

- ``P(s > pi) = sum_t pi(t) P(s > t)`` for each fixed style s; the policy's win-rate against s
  is ``1 - P(s > pi)``;
- exploitability ``max_s P(s > pi) - 1/2``: 0 at the equilibrium, 1/2 for a pure style, 0.25 at
  the default start.

``Trajectory`` records the style distribution of every iterate a trainer produces (it hooks
the evaluation reward and the preference function the trainers receive), so the last iterate
and the average policy (the uniform mixture of the iterates, which the no-regret guarantees of
self-play methods refer to) can both be measured.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

STYLES = ("A", "B", "C")
BEATS = {"B": "A", "C": "B", "A": "C"}  # winner -> the style it beats
START = (0.6, 0.3, 0.1)


def payoff() -> torch.Tensor:
    """``M[i, j] = P(style_i > style_j)``, ``[3, 3]`` (rows sum to 3/2: no style dominates)."""
    return torch.tensor([[0.5 if a == b else 1.0 if BEATS[a] == b else 0.0 for b in STYLES] for a in STYLES])


def preference(prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
    """The cyclic ``PreferenceFn``: P(a > b) in {0, 1/2, 1}; an answer that is no style loses to
    every style (so a policy gains nothing by leaving the game)."""
    out = []
    for a, b in zip(responses_a, responses_b):
        a, b = a.strip(), b.strip()
        if a == b or (a not in STYLES and b not in STYLES):
            out.append(0.5)
        elif a not in STYLES or b not in STYLES:
            out.append(1.0 if a in STYLES else 0.0)
        else:
            out.append(1.0 if BEATS[a] == b else 0.0)
    return out


def prompts(n: int, offset: int = 0) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Play round {offset + i}"}] for i in range(n)]


@torch.no_grad()
def style_probs(model: torch.nn.Module, tokenizer: Any, prompt: list[dict] | None = None) -> torch.Tensor:
    """``pi(s | x)`` of the three styles (eos included), ``[3]``; their sum is the policy's mass on
    the game (1 minus what it spends on other texts)."""
    from alignflow.trainers.logprobs import response_logps

    was_training = model.training
    model.eval()
    logps, _ = response_logps(model, tokenizer, [prompt or prompts(1, offset=1000)[0]], [list(STYLES)])
    model.train(was_training)
    return logps[0].double().exp().cpu()


def exploitability(probs: torch.Tensor) -> float:
    """``max_s P(s > pi) - 1/2`` for the style distribution ``probs`` (normalised here)."""
    p = probs.double() / probs.double().sum()
    return float((payoff().double() @ p).max() - 0.5)


def winrates_against_styles(probs: torch.Tensor) -> list[float]:
    """The policy's win-rate ``1 - P(s > pi)`` against each fixed style (all 1/2 at the equilibrium)."""
    p = probs.double() / probs.double().sum()
    return (1.0 - payoff().double() @ p).tolist()


def build_policy(tokenizer: Any = None, start: Sequence[float] = START, seed: int = 0, steps: int = 80,
                 lr: float = 1e-2):
    """A tiny Llama whose answer to every ``Play round i`` prompt follows ``start`` over the styles
    (cross-entropy to the distribution itself, so the fit is exact up to optimisation). Returns
    (model, tokenizer, 16 training prompts)."""
    from alignflow.trainers.logprobs import response_logps
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    tokenizer = tokenizer or make_char_tokenizer()
    model = make_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    train = prompts(16)
    target = torch.tensor(start, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            logps, _ = response_logps(model, tokenizer, train, [list(STYLES)] * len(train))
            loss = -(logps * target).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, tokenizer, train


def fit_bt_rewards(model: torch.nn.Module, tokenizer: Any, make_generator: Any, n_prompts: int = 64, k: int = 4,
                   seed: int = 0) -> torch.Tensor:
    """Bradley-Terry rewards of the three styles (eq. 1), fitted by maximum likelihood on the
    cyclic preference over all pairs of ``k`` samples per prompt from ``model``: the best any
    pointwise reward can do with these labels. ``[3]``."""
    from alignflow.schemas.generator import SamplingParams

    gens = make_generator(model, tokenizer).generate(
        prompts(n_prompts, offset=500), n=k, sampling=SamplingParams(temperature=1.0, max_new_tokens=4, seed=seed))
    wins = torch.zeros(3, 3, dtype=torch.float64)  # wins[i, j]: times style i beat style j
    for group in gens:
        texts = [g.text.strip() for g in group]
        for i in range(k):
            for j in range(i + 1, k):
                a, b = texts[i], texts[j]
                if a in STYLES and b in STYLES and a != b:
                    p = preference([None], [a], [b])[0]
                    wins[STYLES.index(a), STYLES.index(b)] += p
                    wins[STYLES.index(b), STYLES.index(a)] += 1 - p
    r = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([r], max_iter=200)

    def nll():
        opt.zero_grad()
        loss = -(wins * torch.nn.functional.logsigmoid(r[:, None] - r[None, :])).sum() + 1e-3 * (r ** 2).sum()
        loss.backward()
        return loss

    opt.step(nll)
    return r.detach()


def bt_reward_fn(rewards: torch.Tensor):
    """``RewardFn`` of fitted style rewards; a text that is no style gets less than every style."""
    low = float(rewards.min()) - 1.0

    def reward(prompts_: Sequence[Any], responses: Sequence[str]) -> list[float]:
        return [float(rewards[STYLES.index(r.strip())]) if r.strip() in STYLES else low for r in responses]

    return reward


def winrate_vs_uniform(prompts_: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """An evaluation "reward" for the trainers' reports: a response's win-rate against the
    equilibrium mix (1/2 for every style, 0 for anything else)."""
    return [sum(preference([None] * 3, [r] * 3, list(STYLES))) / 3 for r in responses]


class Trajectory:
    """The style distributions of the successive iterates of one training run.

    The trainers update the live policy in place; the hooks look at it whenever the trainer
    calls what it received. ``reward(policy, fn)`` wraps the evaluation reward (the iterative
    trainers call it once on the start, once after every round, once at the end);
    ``preference(policy, fn)`` wraps the preference (Nash-MD calls it once per step, before the
    step's update). ``iterates(first, last)`` picks the records that are the iterates."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.dists: list[torch.Tensor] = []

    def observe(self, model: torch.nn.Module) -> None:
        self.dists.append(style_probs(model, self.tokenizer))

    def reward(self, policy: torch.nn.Module, fn: Any = None):
        fn = fn or winrate_vs_uniform

        def score(prompts_, responses):
            self.observe(policy)
            return fn(prompts_, responses)

        return score

    def preference(self, policy: torch.nn.Module, fn: Any = None):
        fn = fn or preference

        def prefer(prompts_, a, b):
            self.observe(policy)
            return fn(prompts_, a, b)

        return prefer


def average_policy(dists: Sequence[torch.Tensor]) -> torch.Tensor:
    """The uniform mixture of the iterates (each normalised to the game): the average policy
    whose exploitability the no-regret analyses of self-play (SPPO, DNO) bound."""
    return torch.stack([d / d.sum() for d in dists]).mean(0)


GAME_METHODS = ("nash-md", "sppo", "dno", "bt-dpo")


def run_method(method: str, start_policy: torch.nn.Module, tokenizer: Any, train_prompts: Sequence[Any],
               bt_rewards: torch.Tensor | None = None, seed: int = 0, rounds: int = 40, steps: int = 160,
               make_generator: Any = None) -> list[torch.Tensor]:
    """Train a copy of ``start_policy`` on the game with ``method``; returns the style
    distributions of its iterates 1..T (T = ``rounds`` for the iterative methods, ``steps`` for
    Nash-MD). ``bt-dpo`` is iterative DPO (best vs worst of K) on the fitted BT rewards
    ``bt_rewards``; sppo and dno play against the live policy's samples (DNO with no gold
    answers); Nash-MD against the geometric mixture of the live policy and the start."""
    import copy

    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative
    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

    if make_generator is None:
        from alignflow.flows.online import policy_generator_factory

        make_generator = policy_generator_factory("cpu")
    policy = copy.deepcopy(start_policy)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4)
    trajectory = Trajectory(tokenizer)
    eval_prompts = prompts(2, offset=900)
    if method == "nash-md":
        cfg = NashMDConfig(steps=steps, prompts_per_step=16, lr=1e-3, sampling=sampling, seed=seed)
        train_nash_md(policy, tokenizer, train_prompts, make_generator, trajectory.preference(policy), cfg,
                      eval_prompts=eval_prompts, eval_reward_fn=trajectory.reward(policy))
        return trajectory.dists[2:]  # [start (evaluation), pi_0 .. pi_{T-1} (steps), pi_T (evaluation)]
    if method not in GAME_METHODS:
        raise ValueError(f"unknown game method {method!r}; known: {', '.join(GAME_METHODS)}")
    extra = {"beta": 0.2} if method == "sppo" else {}
    cfg = IterativeConfig(method="iterative-dpo" if method == "bt-dpo" else method, rounds=rounds,
                          prompts_per_round=16, k=4, epochs=2, batch_size=8, lr=2e-3, terminate=False,
                          sampling=sampling, seed=seed, **extra)
    reward_fn = bt_reward_fn(bt_rewards) if method == "bt-dpo" else None
    train_iterative(policy, tokenizer, train_prompts, make_generator, cfg, reward_fn=reward_fn,
                    preference_fn=None if method == "bt-dpo" else preference,
                    eval_prompts=eval_prompts, eval_reward_fn=trajectory.reward(policy))
    return trajectory.dists[1:-1]  # [start, after round 1 .. T, final (= round T)]
