"""SipHash-2-4 of every string of an Arrow column at once, in numpy.

``prompt_id`` is pandas' ``hash_array`` of the canonical prompt text (SipHash-2-4 under pandas'
fixed key, then a 64-bit mixing step), so ids written by earlier versions stay valid. Importing
pandas costs 0.15-0.25 s on a 2-core machine, most of a short ``alignflow convert``; this module
computes the same numbers without it. The hash runs over 8-byte blocks, one numpy pass per
block index for all strings still that long, so its cost grows with the *longest* string:
``block_counts`` lets the caller hand long or huge inputs to pandas' C loop instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PANDAS_KEY = b"0123456789123456"  # pandas.core.util.hashing's default hash_key


def _rotl(x: np.ndarray, bits: int) -> np.ndarray:
    return (x << np.uint64(bits)) | (x >> np.uint64(64 - bits))


def _sip_rounds(v0, v1, v2, v3, rounds: int):
    for _ in range(rounds):
        v0 += v1
        v1 = _rotl(v1, 13)
        v1 ^= v0
        v0 = _rotl(v0, 32)
        v2 += v3
        v3 = _rotl(v3, 16)
        v3 ^= v2
        v0 += v3
        v3 = _rotl(v3, 21)
        v3 ^= v0
        v2 += v1
        v1 = _rotl(v1, 17)
        v1 ^= v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def _offsets_and_bytes(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """int64 offsets (len + 1, from 0) and the bytes they index, 8 zero bytes of padding after."""
    strings = strings.cast(pa.large_binary())
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data[offsets[0]:offsets[-1]], np.zeros(8, np.uint8)])
    return offsets - offsets[0], data


def block_counts(strings: pa.Array) -> tuple[int, int]:
    """(longest string's 8-byte blocks, all strings' blocks): what the numpy hash's time grows with."""
    lengths = pc.binary_length(strings)
    longest = pc.max(lengths).as_py() or 0
    return longest // 8 + 1, int(pc.sum(lengths).as_py() or 0) // 8 + len(strings)


def siphash24(strings: pa.Array, key: bytes = PANDAS_KEY) -> np.ndarray:
    """SipHash-2-4 of each value's UTF-8 bytes, as uint64; nulls hash as the text ``None``
    (what pandas does with a null in an object array).

    strings: (n,) string or binary array. Returns (n,) uint64.
    """
    if strings.null_count:
        strings = pc.fill_null(strings.cast(pa.large_binary()), b"None")
    offsets, data = _offsets_and_bytes(strings)
    lengths = np.diff(offsets)
    n = len(lengths)
    k0, k1 = np.frombuffer(key, "<u8")
    full_blocks = lengths // 8

    # Rows longest first, so the rows still hashing at block j are a prefix [:active[j]].
    order = np.argsort(-full_blocks, kind="stable")
    starts = offsets[:-1][order]
    sorted_blocks = full_blocks[order]
    v0 = np.full(n, np.uint64(0x736F6D6570736575) ^ k0)
    v1 = np.full(n, np.uint64(0x646F72616E646F6D) ^ k1)
    v2 = np.full(n, np.uint64(0x6C7967656E657261) ^ k0)
    v3 = np.full(n, np.uint64(0x7465646279746573) ^ k1)
    # Every 8-byte window of the data as one row, so a gather reads unaligned little-endian words.
    windows = np.lib.stride_tricks.as_strided(data, shape=(max(len(data) - 7, 0), 8), strides=(1, 1))

    def words(positions: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(windows[positions]).view("<u8").ravel()

    max_blocks = int(sorted_blocks[0]) if n else 0
    active_counts = np.searchsorted(-sorted_blocks, -np.arange(max_blocks), side="left")
    for block, active in enumerate(active_counts.tolist()):
        m = words(starts[:active] + 8 * block)
        a0, a1, a2, a3 = v0[:active], v1[:active], v2[:active], v3[:active]
        a3 ^= m
        a0, a1, a2, a3 = _sip_rounds(a0, a1, a2, a3, 2)
        a0 ^= m
        v0[:active], v1[:active], v2[:active], v3[:active] = a0, a1, a2, a3

    # Last block: the 0-7 remaining bytes, with the length's low byte on top.
    tail_len = (lengths[order] & 7).astype(np.uint64)
    tail = words(starts + 8 * sorted_blocks) & ((np.uint64(1) << (np.uint64(8) * tail_len)) - np.uint64(1))
    b = (lengths[order].astype(np.uint64) << np.uint64(56)) | tail
    v3 ^= b
    v0, v1, v2, v3 = _sip_rounds(v0, v1, v2, v3, 2)
    v0 ^= b
    v2 ^= np.uint64(0xFF)
    v0, v1, v2, v3 = _sip_rounds(v0, v1, v2, v3, 4)
    out = np.empty(n, np.uint64)
    out[order] = v0 ^ v1 ^ v2 ^ v3
    return out


def pandas_hash_mix(hashes: np.ndarray) -> np.ndarray:
    """The step pandas' ``hash_array`` applies after hashing objects (spreads values over 64 bits)."""
    hashes = hashes.copy()
    hashes ^= hashes >> np.uint64(30)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(27)
    hashes *= np.uint64(0x94D049BB133111EB)
    hashes ^= hashes >> np.uint64(31)
    return hashes
