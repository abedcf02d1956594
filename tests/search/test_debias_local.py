"""The query-local measures behind ``ablate`` and ``project`` (saefe.search.debias_local), on
small hand-made arrays: exact properties, no quality thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from saefe.labels.demographics import AttributeGroups
from saefe.search import debias_local as loc
from saefe.search.debias import project


def _groups(labels: list[int], n_groups: int = 2, soft: dict[int, list[float]] | None = None) -> AttributeGroups:
    member = np.zeros((len(labels), n_groups), np.float32)
    for i, g in enumerate(labels):
        if g >= 0:
            member[i, g] = 1.0
    est = np.zeros(len(labels), bool)
    for i, p in (soft or {}).items():
        member[i] = p
        est[i] = True
    return AttributeGroups("gender", ["Male", "Female"][:n_groups] if n_groups == 2 else [f"g{j}" for j in range(n_groups)],
                           member, est)


def test_neighbourhood_is_the_shortest_prefix_holding_every_group():
    ag = _groups([0, 0, 0, 1, 0, 1, 1, 0])
    ranked = np.arange(8)[::-1]  # best first: 7, 6, 5, ...
    nb = loc.neighbourhood(ranked, [ag], per_group=2)
    assert nb.ids.tolist() == [7, 6, 5, 4] and nb.complete
    assert nb.counts == {"gender": {"Male": 2.0, "Female": 2.0}}
    short = loc.neighbourhood(ranked, [ag], per_group=5)  # only 3 women: all of it, flagged incomplete
    assert len(short.ids) == 8 and not short.complete and short.usable("gender")
    assert not loc.neighbourhood(np.array([0, 1, 2]), [ag], per_group=1).usable("gender")  # no woman at all


def test_neighbourhood_counts_estimates_by_their_probabilities():
    ag = _groups([0, 0, -1, -1], soft={2: [0.5, 0.5], 3: [0.4, 0.6]})
    nb = loc.neighbourhood(np.arange(4), [ag], per_group=1)
    assert nb.ids.tolist() == [0, 1, 2, 3] and nb.counts["gender"]["Female"] == pytest.approx(1.1)


def test_projecting_the_local_directions_equalises_each_groups_mean_score():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16))
    labels = rng.integers(0, 3, size=60).tolist()
    ag = _groups(labels, n_groups=3)
    nb = loc.neighbourhood(np.arange(60), [ag], per_group=5)
    u, owner = loc.local_directions(x[nb.ids], nb, [ag])
    assert u.shape == (2, 16) and owner == ["gender", "gender"] and np.allclose(u @ u.T, np.eye(2), atol=1e-6)
    q = rng.normal(size=16)
    q /= np.linalg.norm(q)
    q1 = project(q, u, 1.0).astype(np.float64)
    means = [x[nb.ids][np.array(labels)[nb.ids] == g].mean(axis=0) @ q1 for g in range(3)]
    assert np.ptp(means) < 1e-5


def test_local_directions_skip_an_attribute_missing_its_groups():
    ag = _groups([0, 0, 0])
    nb = loc.neighbourhood(np.arange(3), [ag], per_group=1)
    u, owner = loc.local_directions(np.ones((3, 4)), nb, [ag])
    assert u.shape == (0, 4) and owner == []


def test_stacked_blocks_are_orthonormal_and_keep_their_owner():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(1, 8)), rng.normal(size=(2, 8))
    u, owner = loc.stack_blocks([("gender", a), ("age", b)], 8)
    assert owner == ["gender", "age", "age"] and np.allclose(u @ u.T, np.eye(3), atol=1e-6)
    assert np.isclose(abs(u[0] @ a[0]), np.linalg.norm(a[0]), rtol=1e-6)  # the first block keeps its direction


def test_activations_read_the_posting_lists_exactly():
    rng = np.random.default_rng(1)
    dense = rng.random((30, 12)) * (rng.random((30, 12)) < 0.3)
    csc = sp.csc_matrix(dense)

    def postings(f):
        lo, hi = csc.indptr[f], csc.indptr[f + 1]
        return csc.indices[lo:hi], csc.data[lo:hi]

    ids = np.array([17, 3, 29, 0, 8])
    feats = [11, 2, 5]
    assert np.array_equal(loc.activations(postings, ids, feats), dense[np.ix_(ids, feats)])


def test_feature_gaps_and_ties_follow_the_weight_sign():
    ag = _groups([0, 0, 0, 1, 1, 1])
    nb = loc.neighbourhood(np.arange(6), [ag], per_group=3)
    acts = np.array([[1, 0, 1], [1, 0, 2], [1, 0, 3], [0, 1, 1], [0, 1, 2], [0, 1, 3]], float)
    gaps = loc.feature_gaps(acts, nb, [ag], {"gender": 0})["gender"]  # towards Male
    assert gaps[0] == pytest.approx(2.0) and gaps[1] == pytest.approx(-2.0) and gaps[2] == pytest.approx(0.0)
    # f0 pulls towards men with a positive weight, f1 with a negative one; f2 does not separate them
    assert loc.tied_features({"gender": gaps}, np.array([0.5, -0.5, 0.5]))["gender"].tolist() == [True, True, False]
    assert loc.tied_features({"gender": gaps}, np.array([-0.5, 0.5, 0.5]))["gender"].tolist() == [False, False, False]


def test_calibrate_picks_the_least_strength_that_meets_the_target():
    ag = _groups([0] * 10 + [1] * 10)
    targets = {"gender": np.array([0.5, 0.5])}
    calls = []

    def search_ids(s):  # the share of men falls from 100% as the strength grows
        calls.append(s)
        n_men = int(round(10 * max(0.0, 1.0 - s / 2)))
        return np.array(list(range(n_men)) + list(range(10, 10 + 10 - n_men)))

    s, dev = loc.calibrate(search_ids, [ag], targets, tol=0.05, grid=(0.0, 0.5, 1.0, 1.5, 2.0))
    assert dev <= 0.05 and 0.5 < s <= 1.0 and calls[0] == 0.0
    assert loc.calibrate(lambda s: np.arange(5, 15), [ag], targets, 0.05, (0.0, 1.0)) == (0.0, 0.0)  # fair already
    s, dev = loc.calibrate(lambda s: np.arange(10), [ag], targets, 0.05, (0.0, 1.0))  # nothing moves
    assert s == 0.0 and dev == pytest.approx(0.5)


def test_calibrate_each_sets_each_attribute_on_its_own_groups():
    """Two attributes, each moved only by its own strength: each lands on its own target, and
    neither is dragged past it by the other's strength."""
    g = _groups([0] * 10 + [1] * 10)
    a = AttributeGroups("age", ["Kid", "Adult"], g.member[::-1].copy(), g.estimated.copy())  # Kid = rows 10..19
    targets = {"gender": np.array([0.5, 0.5]), "age": np.array([0.5, 0.5])}

    def search_ids(st):  # 10 results; gender strength swaps men for women, age strength kids for adults
        men = int(round(10 * max(0.0, 1.0 - st["gender"] / 2)))
        return np.array(list(range(men)) + list(range(10, 20 - men)))

    st, dev = loc.calibrate_each(search_ids, [g, a], targets, tol=0.05, grid=(0.0, 0.5, 1.0, 1.5, 2.0))
    assert dev <= 0.05 and 0.5 < st["gender"] <= 1.0 and st["age"] == 0.0
