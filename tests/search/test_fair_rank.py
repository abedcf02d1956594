"""Fair re-ranking and debias option parsing: the guarantees, on random cases (no index needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saefe.errors import SaefeError, SteeringError
from saefe.search.fair_rank import apportion, fair_rerank, joint_quota


def _random_case(rng):
    n_groups = int(rng.integers(2, 5))
    pool = int(rng.integers(1, 120))
    groups = rng.integers(0, n_groups, pool)
    shares = rng.dirichlet(np.ones(n_groups))
    k = int(rng.integers(1, pool + 3))
    return groups, shares, k


def test_apportion_sums_to_k_and_rounds_each_share():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = rng.dirichlet(np.ones(int(rng.integers(1, 6))))
        k = int(rng.integers(0, 50))
        c = apportion(s, k)
        assert c.sum() == k
        assert (np.abs(c - s * k) < 1 + 1e-9).all()


def test_rerank_meets_target_exactly_when_the_pool_allows_and_keeps_group_order():
    rng = np.random.default_rng(1)
    met_cases = 0
    for _ in range(400):
        groups, shares, k = _random_case(rng)
        fr = fair_rerank(groups, shares, k)
        k_eff = min(k, len(groups))
        assert len(fr.order) == k_eff and len(set(fr.order.tolist())) == k_eff
        got = np.bincount(groups[fr.order], minlength=len(shares))
        assert (got == fr.quota).all() and fr.quota.sum() == k_eff
        wanted = apportion(shares, k_eff)
        if (np.bincount(groups, minlength=len(shares)) >= wanted).all():
            met_cases += 1
            assert fr.met and (got == wanted).all()
        else:
            assert not fr.met and fr.short
            for g in fr.short:  # a short group gives everything it has
                assert got[g] == (groups == g).sum()
        for g in range(len(shares)):  # each group: its most relevant candidates, in order
            picked = fr.order[groups[fr.order] == g]
            assert picked.tolist() == np.flatnonzero(groups == g)[: got[g]].tolist()
        # every prefix holds at least floor(share * i) of each group (feasible proportions)
        prop = fr.quota / max(1, fr.quota.sum())
        for i in range(1, k_eff + 1):
            c = np.bincount(groups[fr.order[:i]], minlength=len(shares))
            assert (c >= np.floor(prop * i + 1e-9) - 1).all()
    assert met_cases > 50


def test_rerank_interleaves_and_reports_a_short_pool():
    g = np.array([0] * 30 + [1] * 3)
    fr = fair_rerank(g, [0.5, 0.5], 20)
    assert not fr.met and fr.short == {1: 7}
    assert sorted(fr.order[g[fr.order] == 1].tolist()) == [30, 31, 32]
    fr = fair_rerank(np.array([0, 0, 0, 1, 1, 1]), [0.5, 0.5], 4)
    assert g is not None and fr.order.tolist() == [0, 3, 1, 4]


def test_joint_quota_keeps_every_marginal_exact():
    rng = np.random.default_rng(2)
    for _ in range(200):
        sizes = [int(rng.integers(2, 4)) for _ in range(int(rng.integers(1, 4)))]
        margs = [rng.dirichlet(np.ones(n)) for n in sizes]
        joint = rng.dirichlet(np.ones(int(np.prod(sizes))))
        k = int(rng.integers(0, 40))
        q = joint_quota(margs, joint, k).reshape(sizes)
        assert q.sum() == k and (q >= 0).all()
        for a, m in enumerate(margs):
            tot = q.sum(axis=tuple(b for b in range(len(sizes)) if b != a))
            assert (tot == apportion(m, k)).all()


def test_bad_shares_are_refused():
    with pytest.raises(ValueError):
        fair_rerank(np.array([0, 1]), [0.0, 0.0], 2)
    with pytest.raises(ValueError):
        fair_rerank(np.array([0, 2]), [0.5, 0.5], 2)


# -- option parsing -----------------------------------------------------------------------------


def test_methods_parse_in_application_order():
    from saefe.search.debias import DebiasConfig, parse_methods

    assert parse_methods("rerank+ablate") == ("ablate", "rerank")
    assert parse_methods("project, rerank") == ("project", "rerank")
    assert parse_methods("none") == () and parse_methods("") == () and parse_methods(None) == ()
    assert DebiasConfig.parse("none", "gender") is None
    cfg = DebiasConfig.parse("ablate+rerank", "gender, age", "parity", pool=500)
    assert cfg.methods == ("ablate", "rerank") and cfg.protect == ("gender", "age") and cfg.pool == 500
    with pytest.raises(SaefeError, match="unknown debias method 'shuffle'"):
        parse_methods("rerank+shuffle")
    with pytest.raises(SaefeError, match="needs --protect"):
        DebiasConfig.parse("rerank", "")


@pytest.mark.parametrize("spec", ["Male", "Male=2", "=0.5", "Male=x"])
def test_bad_targets(spec):
    from saefe.search.debias import parse_target

    with pytest.raises(SaefeError, match="bad --target"):
        parse_target(spec)


def _groups(name, groups, member):
    from saefe.labels.demographics import AttributeGroups

    m = np.asarray(member, np.float32)
    return AttributeGroups(name, groups, m, np.zeros(len(m), bool))


def test_targets_resolve_against_the_groups():
    from saefe.search.debias import resolve_targets

    gender = _groups("gender", ["Male", "Female"], [[1, 0], [1, 0], [1, 0], [0, 1]])
    age = _groups("age", ["Kid", "Teenager", "Adult"], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    t = resolve_targets("corpus", [gender])
    assert t["gender"].tolist() == [0.75, 0.25]
    assert resolve_targets("parity", [age])["age"].tolist() == pytest.approx([1 / 3] * 3)
    t = resolve_targets("male=0.5,Female=0.5", [gender, age])
    assert t["gender"].tolist() == [0.5, 0.5] and t["age"].tolist() == [0.25, 0.25, 0.5]
    t = resolve_targets("Adult=0.4", [age])  # the rest shared in corpus proportions
    assert t["age"].tolist() == pytest.approx([0.3, 0.3, 0.4])
    with pytest.raises(SaefeError, match="not a group of the protected attributes"):
        resolve_targets("Robot=0.5", [gender])
    with pytest.raises(SaefeError, match="must add up to 1"):
        resolve_targets("Male=0.5,Female=0.2", [gender])


def test_ablate_zeroes_the_flagged_features_and_keeps_the_norm():
    from saefe.search.debias import ablate_mix
    from saefe.search.mix import FeatureMix

    mix = FeatureMix({1: 0.5, 2: -0.25, 3: 0.8, 7: 0.1}, d_hidden=10)
    flagged = np.zeros(10, bool)
    flagged[[3, 7, 9]] = True
    out = ablate_mix(mix, flagged)
    assert set(out) == {1, 2} and out.norm() == pytest.approx(mix.norm())
    assert out[1] / out[2] == pytest.approx(0.5 / -0.25)
    flagged[[1, 2]] = True
    with pytest.raises(SteeringError, match="nothing is left"):
        ablate_mix(mix, flagged)


def test_projection_leaves_the_query_orthogonal_to_the_directions():
    from saefe.labels.probes import orthonormal_basis
    from saefe.search.debias import project

    rng = np.random.default_rng(3)
    for _ in range(50):
        d = int(rng.integers(4, 40))
        u = orthonormal_basis(rng.normal(size=(int(rng.integers(1, 3)), d)), 3).astype(np.float64)
        q = rng.normal(size=d)
        q /= np.linalg.norm(q)
        p = project(q, u, 1.0)
        assert np.abs(u @ p).max() < 1e-5 and math.isclose(float(np.linalg.norm(p)), 1.0, abs_tol=1e-5)
        assert np.allclose(project(q, u, 0.0), q, atol=1e-6)
    with pytest.raises(SteeringError, match="entirely along"):
        project(u[0], u, 1.0)
