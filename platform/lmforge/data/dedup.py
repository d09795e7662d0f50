"""Deduplication across the whole dataset: exact (normalised-text hash) and near (MinHash LSH).

One Ray Data shuffle does both, never collecting documents on the driver. Every document
becomes one row per bucket: its exact-text hash bucket, and one bucket per LSH band (the band
index and that band's slice of its MinHash signature, hashed). `repartition(keys=[bucket],
sort=True)` brings the members of each bucket together; in each bucket the smallest id is
compared with the others (same text hash in an exact bucket; estimated Jaccard, the fraction
of equal signature values, at least `threshold` less two standard errors in an LSH bucket)
and an edge is emitted for each duplicate. Only these edges (one per duplicate candidate, far
fewer than documents) reach the driver, where union-find resolves connected components; the
smallest id of each component survives. A dropped document is an exact duplicate when its
text hash equals its survivor's, else a near duplicate.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
# exact-text buckets are the text hash xor this, so they never meet an LSH band's bucket
_EXACT_SALT = 0x5EED_E4AC_7000_0001
EDGE_COLUMNS = ("src", "dst", "src_hash", "dst_hash")


def exact_hash(text: str) -> int:
    """Hash of the normalised text (lowercased, whitespace collapsed), as an int64."""
    norm = _WS.sub(" ", text.lower()).strip()
    return int.from_bytes(
        hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little", signed=True
    )


def optimal_bands(
    threshold: float, num_perm: int, fp_weight: float = 0.2, fn_weight: float = 0.8
) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative probability mass
    at `threshold`, as datasketch's MinHashLSH chooses them. Its default weights are equal;
    ours favour recall (0.2 / 0.8) because every candidate pair is verified afterwards, so a
    false positive costs a comparison, not a wrongly dropped document."""

    def area(f, a, b, n=200):
        xs = np.linspace(a, b, n)
        return float(np.trapezoid(f(xs), xs))

    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn = area(lambda s, b=b, r=r: 1 - (1 - (1 - s**r) ** b), threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class MinHasher:
    """MinHash signatures with datasketch's permutation scheme: (a * h + b) mod (2^61 - 1),
    truncated to 32 bits, over crc32 hashes of word or character n-gram shingles."""

    def __init__(self, num_perm: int, ngram: int, unit: str, seed: int) -> None:
        rng = np.random.RandomState(seed)
        self.a = rng.randint(1, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
        self.b = rng.randint(0, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
        self.ngram, self.unit = ngram, unit

    def shingles(self, text: str) -> set[bytes]:
        if self.unit == "char":
            t = _WS.sub(" ", text.lower())
            return {t[i : i + self.ngram].encode() for i in range(max(1, len(t) - self.ngram + 1))}
        words = _WORD.findall(text.lower())
        n = self.ngram
        return {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}

    def signature(self, text: str) -> np.ndarray:
        hv = np.fromiter((zlib.crc32(s) for s in self.shingles(text)), dtype=np.uint64)
        if hv.size == 0:
            hv = np.zeros(1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            ph = ((hv[:, None] * self.a[None, :] + self.b[None, :]) % _MERSENNE) & _MAX32
        return ph.min(axis=0).astype(np.uint32)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    """One int64 bucket key per band: a hash of (band index, the band's values)."""
    keys = []
    for b in range(bands):
        h = hashlib.blake2b(
            sig[b * rows : (b + 1) * rows].tobytes(), digest_size=8, salt=b.to_bytes(8, "little")
        )
        keys.append(int.from_bytes(h.digest(), "little", signed=True))
    return keys


# ---------------------------------------------------------------- Ray Data partition functions
# Each runs on one whole block of a `repartition(n, keys=[key], sort=True)`: every row of a key
# is in the same block, sorted by key (what GroupedData.map_groups relies on too), so all groups
# of a partition are handled with a few vectorised operations instead of one call per group.


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For keys sorted ascending: the index of each row's run start, and each run's length per row."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    lengths = np.diff(np.r_[starts, len(keys)])
    return np.repeat(starts, lengths), np.repeat(lengths, lengths)


def explode_buckets(batch: pa.Table, exact: bool, near: bool) -> pa.Table:
    """(id, hash, sig, bands) rows -> one (bucket, id, hash, exact, sig) row per bucket: the
    exact-text hash (when `exact`) and each LSH band key (when `near`)."""
    n = len(batch)
    parts = []
    if exact:
        parts.append(
            pa.table(
                {
                    "bucket": pc.bit_wise_xor(
                        batch.column("hash"), pa.scalar(_EXACT_SALT, pa.int64())
                    ),
                    "id": batch.column("id"),
                    "hash": batch.column("hash"),
                    "exact": pa.array(np.ones(n, dtype=bool)),
                    "sig": batch.column("sig"),
                }
            )
        )
    if near:
        bands = batch.column("bands")
        counts = pc.list_value_length(bands).to_numpy(zero_copy_only=False)
        rows = pa.array(np.repeat(np.arange(n), counts))
        parts.append(
            pa.table(
                {
                    "bucket": pc.list_flatten(bands),
                    "id": batch.column("id").take(rows),
                    "hash": batch.column("hash").take(rows),
                    "exact": pa.array(np.zeros(int(counts.sum()), dtype=bool)),
                    "sig": batch.column("sig").take(rows),
                }
            )
        )
    return pa.concat_tables(parts)


def verify_cutoff(threshold: float, num_perm: int) -> float:
    """The estimated Jaccard a candidate pair needs: `threshold` less two standard errors of
    the estimate, so pairs truly at the threshold are not lost to estimation noise."""
    return threshold - 2 * (threshold * (1 - threshold) / num_perm) ** 0.5


def bucket_edges(block: pa.Table, threshold: float) -> pa.Table:
    """Per bucket: an edge from its smallest id to each other member that is a duplicate of it:
    the same text hash in an exact bucket; in an LSH bucket, an estimated Jaccard (fraction of
    equal MinHash values) of at least `verify_cutoff(threshold, num_perm)`."""
    empty = pa.table({name: pa.array([], pa.int64()) for name in EDGE_COLUMNS})
    if len(block) < 2:
        return empty
    block = block.sort_by([("bucket", "ascending"), ("id", "ascending")])
    start, length = _runs(block.column("bucket").to_numpy())
    rows = np.flatnonzero((length > 1) & (start != np.arange(len(block))))
    if len(rows) == 0:
        return empty
    ids = block.column("id").to_numpy()
    hashes = block.column("hash").to_numpy()
    exact = block.column("exact").to_numpy(zero_copy_only=False)[rows]
    sig = block.column("sig").combine_chunks()
    width = len(sig[0]) if len(sig) else 0
    hit = hashes[rows] == hashes[start[rows]]
    if width and not exact.all():
        values = sig.flatten().to_numpy().reshape(-1, width)
        sim = (values[rows] == values[start[rows]]).mean(axis=1)
        hit = np.where(exact, hit, sim >= verify_cutoff(threshold, width))
    rows = rows[hit]
    src = start[rows]
    return pa.table(
        {"src": ids[src], "dst": ids[rows], "src_hash": hashes[src], "dst_hash": hashes[rows]}
    )


def components(edges: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict[int, int]:
    """Union-find over edge batches: every non-root id -> the smallest id of its component."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for src, dst in edges:
        for a, b in zip(src.tolist(), dst.tolist(), strict=True):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent) if find(x) != x}
