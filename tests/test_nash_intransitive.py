"""Nash learning on a preference no reward can represent (survey 3.13).

The game (tests/intransitive.py): three answer styles with a cyclic preference B > A, C > B,
A > C; the policy starts at 0.6 / 0.3 / 0.1 (exploitability 0.25); the equilibrium is the
uniform mix (exploitability 0). Nash-MD, SPPO and DNO (no gold answers) play against the live
policy; the comparison is iterative DPO on Bradley-Terry rewards fitted to the same preference
over the start policy's samples (B > A > C: the best a pointwise reward can say).

What is asserted is the AVERAGE policy of each run (the uniform mixture of its iterates): the
object the no-regret guarantees of self-play are about. The last iterates of SPPO and DNO
cycle around the equilibrium (multiplicative weights on rock-paper-scissors do; measured last-
iterate exploitability 0.43-0.50 at 40 rounds, seeds 0-4), while BT-DPO converges to the one
style its reward ranks first. Measured (seeds 0-4, 40 rounds / 160 Nash-MD steps): average-
policy exploitability Nash-MD 0.11-0.16, SPPO 0.09-0.14, DNO 0.06-0.12, BT-DPO 0.44-0.47.
"""

from __future__ import annotations

import pytest
import torch

from tests import intransitive as game


@pytest.fixture(scope="module")
def world():
    from alignflow.flows.online import policy_generator_factory

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30 k-parameter model: one thread is as fast, and steadier
    policy, tok, train = game.build_policy(seed=0)
    bt = game.fit_bt_rewards(policy, tok, policy_generator_factory("cpu"), seed=0)
    yield policy, tok, train, bt
    torch.set_num_threads(before)


def test_the_game_is_intransitive_and_the_start_is_exploitable(world):
    policy, tok, _, bt = world
    m = game.payoff()
    assert torch.allclose(m + m.T, torch.ones(3, 3))  # P(a > b) + P(b > a) = 1
    assert all(m[i, j] == 1 for i, j in [(1, 0), (2, 1), (0, 2)])  # B > A, C > B, A > C
    start = game.style_probs(policy, tok)
    assert float(start.sum()) > 0.98
    assert torch.allclose(start / start.sum(), torch.tensor(game.START).double(), atol=0.02)
    assert game.exploitability(start) == pytest.approx(0.25, abs=0.02)
    assert game.exploitability(torch.ones(3)) == pytest.approx(0.0, abs=1e-12)
    # the fitted BT rewards rank the styles B > A > C although C beats B
    assert bt[1] > bt[0] > bt[2]


@pytest.fixture(scope="module")
def bt_dpo(world):
    policy, tok, train, bt = world
    return game.run_method("bt-dpo", policy, tok, train, bt)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nash-md", "sppo", "dno"])
def test_nash_methods_approach_the_mixed_equilibrium_where_bt_dpo_does_not(world, bt_dpo, method):
    policy, tok, train, bt = world
    start = game.exploitability(game.style_probs(policy, tok))
    iterates = game.run_method(method, policy, tok, train, bt)
    average = game.average_policy(iterates)
    bt_average = game.average_policy(bt_dpo)
    e, e_bt = game.exploitability(average), game.exploitability(bt_average)
    assert e < start - 0.05, (method, start, e)
    assert e_bt > start and game.exploitability(bt_dpo[-1]) > 0.45  # BT-DPO commits to one style
    assert e < e_bt - 0.15, (method, e, e_bt)
    # the average policy's win-rate against every fixed style is nearer 1/2 than BT-DPO's
    spread = max(abs(w - 0.5) for w in game.winrates_against_styles(average))
    spread_bt = max(abs(w - 0.5) for w in game.winrates_against_styles(bt_average))
    assert spread < spread_bt - 0.15 and float(iterates[-1].sum()) > 0.5  # still playing the game
