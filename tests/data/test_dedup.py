"""Dedup on planted duplicates, with datasketch's MinHashLSH as the reference."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from lmforge.data import dedup

from .corpus import planted_corpus

THRESHOLD, NUM_PERM = 0.8, 128


def pairs(labels: dict[int, int]) -> set[tuple[int, int]]:
    groups: dict[int, list[int]] = {}
    for doc, label in labels.items():
        groups.setdefault(label, []).append(doc)
    return {p for g in groups.values() for p in itertools.combinations(sorted(g), 2)}


def ours(texts: list[str]) -> dict[int, int]:
    """Cluster label per document from our MinHash + banding + verification + union-find."""
    hasher = dedup.MinHasher(NUM_PERM, 5, "word", seed=1)
    bands, rows = dedup.optimal_bands(THRESHOLD, NUM_PERM)
    sigs = [hasher.signature(t) for t in texts]
    table = pa.table(
        {
            "id": np.arange(len(texts), dtype=np.int64),
            "hash": [dedup.exact_hash(t) for t in texts],
            "sig": pa.array([s.tolist() for s in sigs], pa.list_(pa.uint32())),
            "bands": pa.array(
                [dedup.band_keys(s, bands, rows) for s in sigs], pa.list_(pa.int64())
            ),
        }
    )
    buckets = dedup.explode_buckets(table, exact=False, near=True)
    edges = dedup.bucket_edges(buckets, THRESHOLD)
    roots = dedup.components([(edges["src"].to_numpy(), edges["dst"].to_numpy())])
    return {i: roots.get(i, i) for i in range(len(texts))}


def reference(texts: list[str]) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH

    hasher = dedup.MinHasher(NUM_PERM, 5, "word", seed=1)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    mhs = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(list(hasher.shingles(t)))
        lsh.insert(i, m)
        mhs.append(m)
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            a, b = find(i), find(j)
            parent[max(a, b)] = min(a, b)
    return {i: find(i) for i in range(len(texts))}


def test_near_duplicates_recall_and_precision_vs_datasketch():
    texts, origin = planted_corpus(n_unique=300, n_exact=0, n_near=60, seed=3)
    # the truth: a near copy belongs to the cluster of the document it was made from
    truth = {i: origin.get(i, i) for i in range(len(texts))}
    true_pairs = pairs(truth)

    def score(labels):
        found = pairs(labels)
        hit = len(found & true_pairs)
        return hit / len(true_pairs), hit / max(1, len(found))

    recall, precision = score(ours(texts))
    ref_recall, ref_precision = score(reference(texts))
    assert len(true_pairs) >= 60
    assert recall >= ref_recall and precision >= ref_precision
    assert recall >= 0.95 and precision == 1.0


def _jaccard(a: str, b: str) -> float:
    h = dedup.MinHasher(NUM_PERM, 5, "word", 1)
    sa, sb = h.shingles(a), h.shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_signature_estimates_jaccard():
    texts, origin = planted_corpus(n_unique=20, n_exact=0, n_near=10, seed=5, changes=8)
    h = dedup.MinHasher(256, 5, "word", seed=2)
    for i, j in origin.items():
        est = float((h.signature(texts[i]) == h.signature(texts[j])).mean())
        assert abs(est - _jaccard(texts[i], texts[j])) < 0.12


def test_optimal_bands_match_datasketch():
    from datasketch.lsh import _optimal_param

    for threshold, num_perm in [(0.8, 128), (0.5, 64), (0.9, 256)]:
        ours = dedup.optimal_bands(threshold, num_perm, 0.5, 0.5)
        assert ours == _optimal_param(threshold, num_perm, 0.5, 0.5)
        favour_recall = dedup.optimal_bands(threshold, num_perm)
        assert favour_recall == _optimal_param(threshold, num_perm, 0.2, 0.8)


def test_bucket_edges_exact_and_near():
    sig = lambda *v: list(v) * 4  # noqa: E731  (signatures of 8 values)
    table = pa.table(
        {
            "id": [5, 3, 9, 4, 7],
            "hash": [1, 1, 2, 1, 3],
            "sig": pa.array(
                [sig(1, 2), sig(9, 9), sig(1, 2), sig(8, 8), sig(1, 3)], pa.list_(pa.uint32())
            ),
            "bands": pa.array([[100], [200], [100], [300], [100]], pa.list_(pa.int64())),
        }
    )
    buckets = dedup.explode_buckets(table, exact=True, near=True)
    assert len(buckets) == 10 and buckets["exact"].to_pylist().count(True) == 5
    edges = dedup.bucket_edges(buckets, threshold=0.8).to_pylist()
    pairs = sorted((e["src"], e["dst"]) for e in edges)
    # exact bucket of hash 1: 3 -> 4, 3 -> 5; LSH bucket 100: 5 ~ 9 (same signature),
    # 5 vs 7 only half the values equal: no edge
    assert pairs == [(3, 4), (3, 5), (5, 9)]
    assert dedup.components(
        [(np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]))]
    ) == {4: 3, 5: 3, 9: 3}
    assert dedup.exact_hash("Hello   World\n") == dedup.exact_hash("hello world")
    assert dedup.exact_hash("hello world") != dedup.exact_hash("hello  worlds")


@pytest.mark.parametrize("order", [[(1, 2), (3, 4), (2, 3)], [(2, 3), (3, 4), (1, 2)]])
def test_components_resolve_chains_to_smallest_id(order):
    edges = [(np.array([a]), np.array([b])) for a, b in order] + [(np.array([10]), np.array([11]))]
    assert dedup.components(edges) == {2: 1, 3: 1, 4: 1, 11: 10}
