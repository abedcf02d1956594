"""Feature mixes: slider operations, expressions, query vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saefe.errors import SteeringError
from saefe.labels.profiles import LabelProfiles
from saefe.manifest import EncoderInfo
from saefe.sae.model import SAEConfig, TopKSAE
from saefe.search.mix import FeatureMix, Term, evaluate_expression, parse_expression, query_vector, resolve_features

LABELS = ["Esteem", "Male", "Adult", "Doubt/Confusion", "Valence high", "Self-esteem"]
H = 8


@pytest.fixture
def prof() -> LabelProfiles:
    mean = np.array(
        [
            [0.5, 1.5, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0],  # Esteem (f1 above the slider range)
            [0.1, 0.0, 0.0, 0.6, 0.0, 0.3, 0.0, 0.0],  # Male
            [0.0, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0],  # Adult
            [0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0],  # Doubt/Confusion
            [0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.0],  # Valence high
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4],  # Self-esteem
        ],
        np.float32,
    )
    return LabelProfiles(labels=LABELS, mean=mean, freq=(mean > 0).astype(np.float32), counts=np.ones(6, int))


def test_apply_add_subtract_clip(prof):
    mix = FeatureMix(d_hidden=H)
    mix.apply_label(prof, "Esteem", features=range(H))
    assert mix.to_dict() == pytest.approx({0: 0.5, 1: 1.0, 2: 0, 3: 0.2, 4: 0, 5: 0, 6: 0, 7: 0})
    mix.set(2, 0.9)
    mix.apply_label(prof, "Adult", features=[1, 2])  # only shown sliders change
    assert mix[1] == pytest.approx(0.2) and mix[2] == pytest.approx(0.4) and mix[0] == pytest.approx(0.5)
    mix.reset()
    assert len(mix) == 0 and mix.is_zero()
    mix.add_label(prof, "Esteem", 2.0)  # default: non-zero features of the label
    assert mix.to_dict() == pytest.approx({0: 1.0, 1: 1.0, 3: 0.4})
    mix.subtract_label(prof, "Male", 3.0)
    assert mix.to_dict() == pytest.approx({0: 0.7, 1: 1.0, 3: -1.0, 5: -0.9})
    mix.add_label(prof, "Male", -1.0)  # add with a negative multiplier = subtract
    assert mix[0] == pytest.approx(0.6) and mix[5] == pytest.approx(-1.0)
    mix.set("f7", 5.0)  # manual sliders clip too
    assert mix[7] == 1.0
    mix.set(6, -0.25)
    assert mix[6] == -0.25
    raw = FeatureMix(d_hidden=H, clip=None).set(1, 5.0)
    assert raw[1] == 5.0


def test_l2_and_arrays():
    mix = FeatureMix({3: 0.6, 1: -0.8, 5: 0.0}, d_hidden=H)
    ids, ws = mix.as_arrays()
    assert ids.dtype == np.int64 and ws.dtype == np.float32
    assert ids.tolist() == [1, 3] and ws.tolist() == pytest.approx([-0.8, 0.6])
    n = FeatureMix({0: 0.3, 2: 0.4}).l2_normalised()
    assert n.to_dict() == pytest.approx({0: 0.6, 2: 0.8}) and n.norm() == pytest.approx(1.0)
    with pytest.raises(SteeringError, match="all sliders are zero"):
        FeatureMix({1: 0.0}).l2_normalised()


@pytest.mark.parametrize(
    "feature, weight, msg",
    [
        (8, 0.5, "out of range"),
        (-1, 0.5, "out of range"),
        (1, float("nan"), "finite"),
        (1, float("inf"), "finite"),
        (1, 2e6, r"within \+-1e\+06"),
        ("x", 0.5, "integer"),
        (1.5, 0.5, "integer"),
    ],
)
def test_set_errors(feature, weight, msg):
    with pytest.raises(SteeringError, match=msg):
        FeatureMix(d_hidden=H).set(feature, weight)


def test_multiplier_errors(prof):
    with pytest.raises(SteeringError, match="finite"):
        FeatureMix().add_label(prof, "Esteem", float("nan"))
    with pytest.raises(SteeringError, match="unknown label 'Estem'.*'Esteem'"):
        FeatureMix().add_label(prof, "Estem")
    with pytest.raises(SteeringError, match="out of range"):
        FeatureMix().apply_label(prof, "Esteem", features=[0, 8])


def test_parse_expressions(prof):
    P = lambda s: [(t.coef, t.kind, t.name, t.feature) for t in parse_expression(s, LABELS)]  # noqa: E731
    assert P("Esteem - Male + Adult") == [(1, "label", "Esteem", -1), (-1, "label", "Male", -1), (1, "label", "Adult", -1)]
    assert P("Esteem-Male+Adult") == P("Esteem - Male + Adult")
    assert P("2*Esteem - 0.3 * Male") == [(2, "label", "Esteem", -1), (-0.3, "label", "Male", -1)]
    assert P("Adult + 0.5*Esteem") == [(1, "label", "Adult", -1), (0.5, "label", "Esteem", -1)]
    assert P("-Male*2 + .5 Adult + 1e-1*adult") == [
        (-2, "label", "Male", -1), (0.5, "label", "Adult", -1), (0.1, "label", "Adult", -1)
    ]
    assert P("Esteem + 0.5*f17 - #3") == [(1, "label", "Esteem", -1), (0.5, "feature", "f17", 17), (-1, "feature", "f3", 3)]
    assert P("Doubt/Confusion - valence HIGH") == [(1, "label", "Doubt/Confusion", -1), (-1, "label", "Valence high", -1)]
    # a hyphenated label is one name when known; the longest label wins over "Esteem"-prefixes
    assert P("Self-esteem - Esteem") == [(1, "label", "Self-esteem", -1), (-1, "label", "Esteem", -1)]
    # without a label list names run to the next operator ('-' needs a space before it)
    assert [(t.coef, t.name) for t in parse_expression("Doubt/Confusion - Some label + 2*Self-x")] == [
        (1, "Doubt/Confusion"), (-1, "Some label"), (2, "Self-x")
    ]


@pytest.mark.parametrize(
    "expr, msg",
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("Esteem +", "expected a label or feature .* at the end"),
        ("Esteem Male", "expected '\\+' or '-' before 'Male' at column 8"),
        ("* Male", "expected a label"),
        ("Esteem * Male", "expected a number after"),
        ("2 3 Esteem", "expected a label"),
        ("(Esteem - Male)", "parentheses"),
        ("Estem - Male", "unknown label 'Estem'; did you mean 'Esteem'"),
        ("Esteem + f8", "out of range"),
        ("1e400*Esteem", "finite"),
        ("2e6*Esteem", "within"),
        ("Adult - Adult", "all sliders are zero"),
        ("0*Esteem", "all sliders are zero"),
    ],
)
def test_expression_errors(prof, expr, msg):
    with pytest.raises(SteeringError, match=msg):
        evaluate_expression(expr, prof)


def test_evaluate_matches_button_presses(prof):
    mix = evaluate_expression("Esteem - Male + Adult", prof)
    feats = resolve_features(prof, ["Esteem", "Male", "Adult"])
    assert feats.tolist() == [0, 1, 2, 3, 5]  # non-zero mean for any of the three labels
    manual = FeatureMix(d_hidden=H)
    manual.add_label(prof, "Esteem", 1, features=feats)
    manual.subtract_label(prof, "Male", 1, features=feats)
    manual.add_label(prof, "Adult", 1, features=feats)
    assert mix.to_dict() == pytest.approx(manual.to_dict())
    # clipping happens after each step: Esteem f1 1.5 -> 1.0, then + Adult 0.2 -> 1.0 (not 1.7 -> 1.0 ...)
    assert mix.to_dict() == pytest.approx({0: 0.4, 1: 1.0, 2: 0.4, 3: -0.4, 5: -0.3})
    f = evaluate_expression("2*Esteem - 0.5*f1 + 0.25*#7", prof)
    assert f[1] == pytest.approx(0.5) and f[7] == pytest.approx(0.25) and f[0] == pytest.approx(1.0)
    # explicit slider set and "top" set
    only = evaluate_expression("Esteem - Male", prof, features=[3])
    assert only.to_dict() == pytest.approx({3: -0.4})
    top = evaluate_expression("Doubt/Confusion", prof, features="top", top_n=1)
    assert set(top) == {4}
    with pytest.raises(SteeringError, match="'nonzero', 'top'"):
        evaluate_expression("Esteem", prof, features="all")
    # pre-parsed terms are accepted too
    t = evaluate_expression([Term(1.0, "label", "Adult")], prof)
    assert t.to_dict() == pytest.approx({2: 0.4, 1: 0.2})


def test_query_vector():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_emb=16, d_hidden=64, top_k=4), EncoderInfo("t/e", 16))
    mix = FeatureMix({3: 0.5, 10: -0.25, 63: 1.0, 7: 0.0}, d_hidden=64)
    q = query_vector(mix, sae)
    d = sae.down_proj.weight.detach().numpy().astype(np.float64)
    want = 0.5 * d[:, 3] - 0.25 * d[:, 10] + 1.0 * d[:, 63]
    want /= np.linalg.norm(want)
    assert q.dtype == np.float32 and q.shape == (16,)
    np.testing.assert_allclose(q, want, atol=1e-6)
    assert math.isclose(float(np.linalg.norm(q)), 1.0, rel_tol=1e-5)
    # scaling the mix does not change the direction; a plain dict works too
    np.testing.assert_allclose(query_vector(mix.l2_normalised(), sae), q, atol=1e-6)
    np.testing.assert_allclose(query_vector({3: 0.5, 10: -0.25, 63: 1.0}, sae), q, atol=1e-6)
    with pytest.raises(SteeringError, match="all sliders are zero"):
        query_vector(FeatureMix({1: 0.0}), sae)
    with pytest.raises(SteeringError, match="out of range"):
        query_vector(FeatureMix({64: 1.0}), sae)
