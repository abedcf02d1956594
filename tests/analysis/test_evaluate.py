"""``saefe evaluate``: probes beat chance, deterministic split, bias rows, JSON, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saefe.errors import SaefeError


@pytest.fixture(scope="module")
def synth(tmp_path_factory, demo_encoder):
    from fixtures.synthetic import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("synth_eval"), demo_encoder.info, n=300, seed=1)


def test_split_is_deterministic_and_disjoint():
    from saefe.analysis.evaluate import split_images

    a_tr, a_te = split_images(np.arange(100), 0.3, seed=0)
    b_tr, b_te = split_images(np.arange(100), 0.3, seed=0)
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_te, b_te)
    assert len(a_te) == 30 and not set(a_tr) & set(a_te)
    with pytest.raises(SaefeError, match="strictly between"):
        split_images(np.arange(10), 1.0)


def test_average_precision():
    from saefe.analysis.evaluate import average_precision

    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_label_report_is_complete_and_deterministic(synth):
    from saefe.labels.annotations import read_annotations
    from saefe.search.engine import Engine
    from saefe.analysis.evaluate import evaluate_bias, evaluate_labels, format_report

    eng = Engine.open(synth[0])
    mem = read_annotations(synth[2], eng.store)
    rep = evaluate_labels(eng, mem, test_fraction=0.3, seed=0)
    assert rep.n_train + rep.n_test == 300
    assert {r.label for r in rep.labels} == set(mem.labels)
    # quality (AP against chance) is measured in benchmarks, not asserted here
    for key in ("chance", "ap_sae", "ap_raw"):
        assert 0.0 <= rep.mAP[key] <= 1.0
    for r in rep.labels:
        assert 0 < r.n_features <= eng.sae.config.d_hidden
        assert 0.0 <= r.ap_zero_shot <= 1.0
    rep2 = evaluate_labels(eng, mem, test_fraction=0.3, seed=0)
    assert [r.ap_sae for r in rep.labels] == [r.ap_sae for r in rep2.labels]

    import pandas as pd

    attrs = pd.DataFrame(mem.matrix.astype(np.uint8), columns=mem.labels)
    evaluate_bias(eng, attrs, "Esteem", "Esteem - Male + Adult", k=20, report=rep)
    assert [(b.mode, b.query) for b in rep.bias] == [
        ("direction", "Esteem"), ("direction", "Esteem - Male + Adult"),
        ("features", "Esteem"), ("features", "Esteem - Male + Adult")]
    d_label, d_expr = rep.bias[0], rep.bias[1]
    for d in (d_label, d_expr):  # whether an expression lowers a share is measured in benchmarks
        assert sum(d.shares["gender"].values()) <= 1.0 + 1e-9
    text = format_report(rep)
    assert "mAP" in text and "MaxSkew" in text and "zero-shot" in text


def test_cli_json_and_table(synth, capsys):
    from saefe.cli.main import main

    rc = main(["evaluate", "--index", str(synth[0]), "--annotations", str(synth[2]), "--json", "--k", "10"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_test"] == 90 and len(out["labels"]) == 8 and len(out["bias"]) == 4
    assert set(out["mAP"]) == {"chance", "ap_sae", "ap_raw", "ap_zero_shot"}
    rc = main(["evaluate", "--index", str(synth[0]), "--annotations", str(synth[2]), "--no-bias",
               "--only", "Esteem", "Male", "--penalty", "l2", "--no-zero-shot"])
    text = capsys.readouterr().out
    assert rc == 0 and "Esteem" in text and "Happiness" not in text and "bias" not in text


@pytest.mark.parametrize("extra,msg", [
    (["--test-fraction", "0"], "strictly between"),
    (["--k", "0"], "at least 1"),
    (["--only", "Nope"], "not in the annotations"),
    (["--C", "-1"], "positive"),
    (["--bias-label", "Nope"], "unknown label"),
])
def test_cli_errors(synth, capsys, extra, msg):
    from saefe.cli.main import main

    rc = main(["evaluate", "--index", str(synth[0]), "--annotations", str(synth[2]), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err


def test_cli_missing_annotations(synth, tmp_path, capsys):
    from saefe.cli.main import main

    rc = main(["evaluate", "--index", str(synth[0]), "--annotations", str(tmp_path / "nope.csv")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
