"""The decomposition's DP keeps exactly the states no other state dominates (solvers/decompose.py's _dominant
answers that with a Fenwick tree; here it is checked against the pairwise definition)."""

import random

from solvers.decompose import _dominant


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
