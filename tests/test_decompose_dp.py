"""The decomposition's DP keeps exactly the states no other state dominates (solvers/decompose.py's _dominant
answers that with a Fenwick tree; here it is checked against the pairwise definition)."""

import random

from solvers.decompose import BlockOption, _dominant, pareto


def dominated_pairwise(states: dict) -> set:
    """States another one with the same flag beats or ties on kept bytes, pending bytes and seconds."""
    return {key for key in states for other in states
            if other != key and other[2] == key[2] and other[0] <= key[0] and other[1] <= key[1]
            and states[other][0] <= states[key][0]}


def test_the_front_is_every_state_no_other_dominates():
    rng = random.Random(0)
    for _ in range(200):
        states = {}
        for _ in range(rng.randint(0, 120)):
            key = (rng.randint(0, 20), rng.randint(0, 20), rng.random() < 0.5)
            states[key] = (round(rng.random(), 1), ())  # rounded: ties in seconds happen
        front = _dominant(states)
        assert set(front) == set(states) - dominated_pairwise(states)
        assert all(front[key] == states[key] for key in front)


def test_options_with_the_same_figures_keep_one_and_a_beaten_one_goes():
    """Twins (the same seconds, gap and peaks from different rows, as a block MILP gives for several targets) each
    dropped the other, and the curve lost that point: decompose then found no plan with more time (mlp at 140 MB:
    a plan at 2 s, none at 3 s), or after an earlier solve had filled its cache of block solutions."""
    def option(seconds, gap, rows):
        return BlockOption(gap, seconds, 100, 100, rows, "optimal")

    cheap_but_wide = option(1.0, 50, ((0,), (1,)))
    twins = [option(2.0, 10, ((0,), (0, 1))), option(2.0, 10, ((0, 1), (1,)))]
    beaten = option(2.5, 10, ((0,), (0, 1)))
    assert pareto([cheap_but_wide, *twins, beaten]) == [twins[0], cheap_but_wide]
