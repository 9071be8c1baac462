"""The vectorised PCG64 seeding is numpy's own, bit for bit: the synthetic source's content hashes rest on it."""

from __future__ import annotations

import numpy as np

from refresher.sources._pcg64_seeds import pcg64_states

EDGES = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1]


def test_the_states_are_those_numpy_seeds_for_random_and_edge_seeds() -> None:
    rng = np.random.default_rng(13)
    seeds = [int(s) for s in rng.integers(0, 2**64, 3000, dtype=np.uint64)] + EDGES
    assert pcg64_states(seeds) == [np.random.PCG64(seed).state for seed in seeds]


def test_a_generator_pointed_at_a_state_draws_what_a_fresh_one_draws() -> None:
    bits = np.random.PCG64()
    shared = np.random.Generator(bits)
    shared.standard_normal(7)  # whatever it drew before
    for seed, state in zip(EDGES, pcg64_states(EDGES), strict=True):
        bits.state = state
        fresh = np.random.Generator(np.random.PCG64(seed))
        assert np.array_equal(shared.standard_normal(1561), fresh.standard_normal(1561))


def test_no_seeds_no_states() -> None:
    assert pcg64_states([]) == []
