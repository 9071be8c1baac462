"""The states ``numpy.random.PCG64(seed)`` starts from, computed for many integer seeds at once.

The synthetic source draws each session's minutes from its own ``PCG64(seed)``, one per session: 25,000 of them
for backtesting's 100 symbols x 12 months of minute bars (daily bars use none). Constructing one costs 25-40 us, three quarters of it in ``SeedSequence``'s
hashing, against 15 us for the session's draws; here the hashing runs vectorised over a batch's sessions (under
1 us each), and one generator is re-pointed at each state (``bit_generator.state = ...``, 2.5 us). The draws are
the same bits: numpy's seeding is reproduced exactly (``SeedSequence`` with its default pool of four 32-bit
words, then ``pcg_setseq_128_srandom_r``), and ``tests/refresher/sources/test_pcg64_seeds.py`` holds it equal to
numpy's own on random and edge seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import numpy.typing as npt

# numpy/random/bit_generator.pyx (SeedSequence) and pcg64.h (PCG_DEFAULT_MULTIPLIER_128).
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL = 4
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341
_MASK_128 = (1 << 128) - 1

U32 = npt.NDArray[np.uint32]


class _Internal(TypedDict):
    state: int
    inc: int


class PCG64State(TypedDict):
    """What ``PCG64.state`` reads and takes (numpy's own TypedDict is private)."""

    bit_generator: str
    state: _Internal
    has_uint32: int
    uinteger: int


def _hashmix(value: U32, hash_const: U32) -> tuple[U32, U32]:
    value = value ^ hash_const
    hash_const = hash_const * np.uint32(_MULT_A)
    value = value * hash_const
    return np.asarray(value ^ (value >> np.uint32(16)), dtype=np.uint32), hash_const


def _mix(x: U32, y: U32) -> U32:
    result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
    return np.asarray(result ^ (result >> np.uint32(16)), dtype=np.uint32)


def _seed_words(seeds: Sequence[int]) -> list[npt.NDArray[np.uint64]]:
    """``SeedSequence(seed).generate_state(4, np.uint64)`` of each seed (< 2**64), as four arrays of words."""
    keys = np.asarray(seeds, dtype=np.uint64)
    # A seed is its 32-bit words, low first; one below 2**32 is one word, and its missing second word mixes in
    # as the pool's zero fill would: the same value.
    entropy = [(keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), (keys >> np.uint64(32)).astype(np.uint32)]
    with np.errstate(over="ignore"):
        hash_const = np.full(len(keys), _INIT_A, dtype=np.uint32)
        pool: list[U32] = []
        for i in range(_POOL):
            word, hash_const = _hashmix(
                entropy[i] if i < len(entropy) else np.zeros_like(entropy[0]), hash_const
            )
            pool.append(word)
        for i_src in range(_POOL):
            for i_dst in range(_POOL):
                if i_src != i_dst:
                    hashed, hash_const = _hashmix(pool[i_src], hash_const)
                    pool[i_dst] = _mix(pool[i_dst], hashed)
        out_const = np.full(len(keys), _INIT_B, dtype=np.uint32)
        words: list[npt.NDArray[np.uint64]] = []
        for i in range(2 * 4):  # four 64-bit words, each two 32-bit ones, low first
            value = pool[i % _POOL] ^ out_const
            out_const = out_const * np.uint32(_MULT_B)
            value = value * out_const
            words.append((value ^ (value >> np.uint32(16))).astype(np.uint64))
    return [words[2 * i] | (words[2 * i + 1] << np.uint64(32)) for i in range(4)]


def pcg64_states(seeds: Sequence[int]) -> list[PCG64State]:
    """The ``state`` of ``numpy.random.PCG64(seed)`` just made, for each seed (an int in [0, 2**64))."""
    states: list[PCG64State] = []
    for a, b, c, d in zip(*(words.tolist() for words in _seed_words(seeds)), strict=True):
        initstate, initseq = (a << 64) | b, (c << 64) | d
        inc = ((initseq << 1) | 1) & _MASK_128
        state = ((inc + initstate) * _PCG_MULT + inc) & _MASK_128  # two LCG steps from 0, initstate between
        states.append(
            {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}
        )
    return states


__all__ = ["PCG64State", "pcg64_states"]
