"""Segmentation regions for silent-signal rebalancing: connected one-colour
regions, with the specks that anti-aliasing and JPEG leave merged away.

An anti-aliased or JPEG-compressed segmentation map has thousands of distinct
colours along its boundaries; read as "one colour = one region" each of them
would be a region of its own and silencing would scatter noise-like holes.
``merge_small_regions`` makes every connected one-colour region smaller than
``min_area`` pixels part of the neighbour it shares the longest border with.
"""

from __future__ import annotations

import numpy as np


def connected_regions(labels: np.ndarray) -> np.ndarray:
    """(H, W) int64 ids of the 4-connected components of equal label, 0..n-1
    (scikit-image's one-pass labelling of an integer image)."""
    from skimage.measure import label

    return label(labels, background=-1, connectivity=1).astype(np.int64) - 1


def merge_small_regions(labels: np.ndarray, min_area: int, max_rounds: int = 20) -> np.ndarray:
    """Connected regions of ``labels`` with every region below ``min_area`` pixels
    merged into the neighbour it shares the longest border with; ids 0..n-1.

    Vectorised rounds: each small region picks its longest-border neighbour,
    the resulting "points to" graph is collapsed into groups (a group holds at
    most one large region, which every small one in it joins; specks that
    pick each other form a group of their own), and the round repeats until
    no region is small. ``min_area <= 1`` only splits into connected regions."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    comp = connected_regions(labels)
    for _ in range(max_rounds if min_area > 1 else 0):
        n = int(comp.max()) + 1
        small = np.bincount(comp.ravel(), minlength=n) < min_area
        if n == 1 or not small.any():
            break
        a = np.concatenate([comp[:, :-1].ravel(), comp[:-1, :].ravel()])
        b = np.concatenate([comp[:, 1:].ravel(), comp[1:, :].ravel()])
        border = a != b
        a, b = np.concatenate([a[border], b[border]]), np.concatenate([b[border], a[border]])
        keep = small[a]
        if not keep.any():
            break
        pairs, counts = np.unique(a[keep] * n + b[keep], return_counts=True)
        src, dst = pairs // n, pairs % n
        order = np.lexsort((-counts, src))  # per source region, its longest border first
        src, dst = src[order], dst[order]
        first = np.r_[True, src[1:] != src[:-1]]
        graph = coo_matrix((np.ones(int(first.sum())), (src[first], dst[first])), shape=(n, n))
        _, group = connected_components(graph, directed=True, connection="weak")
        merged = group[comp]
        if int(merged.max()) + 1 == n:
            break
        comp = merged
    return np.unique(comp, return_inverse=True)[1].reshape(comp.shape)
