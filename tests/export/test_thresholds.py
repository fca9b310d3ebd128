"""The one threshold type: typed failures that read as the manifest has always recorded them,
the manifest's JSON shape, and the bars an export's options give."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mra.core.errors import MraError
from mra.export.thresholds import DEFAULT_BARS, Failure, Threshold, default_bar, llm_bar, vision_bar
from mra.runtime.compare import image_cosines


def test_vision_failures_keep_their_words():
    t = Threshold(max_rel_err=1e-4, min_cosine=0.99999999)
    failures = t.failures({"rel_err": 2.5e-4, "cosine": 0.98})
    assert failures == [Failure("max_rel_err", 2.5e-4, 1e-4), Failure("min_cosine", 0.98, 0.99999999)]
    assert [str(f) for f in failures] == ["relative error 0.00025 > 0.0001", "mean cosine 0.98000000 < 0.99999999"]
    assert failures[0].metric.measured == "rel_err" and failures[1].metric.op == ">="
    assert t.describe() == "max rel err <= 0.0001, min cosine >= 0.99999999"
    assert t.flags == "--max-rel-err / --min-cosine"


def test_llm_failures_keep_their_words():
    t = Threshold(kl_mean=1e-2, top1=0.9)
    assert [str(f) for f in t.failures({"kl_mean": 0.0123, "top1": 0.85})] == [
        "kl_mean 0.0123, expected <= 0.01", "top1 0.85, expected >= 0.9"]
    assert t.passes({"kl_mean": 0.01, "top1": 0.9})


def test_nan_misses_every_bar():
    for t in (Threshold(max_rel_err=1e-4), Threshold(min_cosine=0.9), Threshold(kl_mean=1.0), Threshold(top1=0.0)):
        assert not t.passes({"rel_err": math.nan, "cosine": math.nan, "kl_mean": math.nan, "top1": math.nan})


def test_manifest_shape_round_trips():
    t = Threshold(max_rel_err=None, min_cosine=0.98)
    assert t.to_dict() == {"min_cosine": 0.98} and Threshold.from_dict(t.to_dict()) == t
    assert t["min_cosine"] == 0.98 and t.get("max_rel_err") is None
    assert t.with_bars(min_cosine=None).to_dict() == {"min_cosine": 0.98}
    assert Threshold(kl_mean=5e-2, top1=0.6).with_bars(top1=0.0).to_dict() == {"kl_mean": 5e-2, "top1": 0.0}
    assert Threshold(rel_err=1e-2, top1=0.6).wide_open().to_dict() == {"rel_err": 1e9, "top1": 0.0}
    with pytest.raises(MraError, match=r"threshold \| got a bar named 'max_kl'"):
        Threshold.from_dict({"max_kl": 1.0})


def test_one_table_of_defaults_and_the_options_over_it():
    assert set(DEFAULT_BARS["vision"]) == {"fp32", "fp16", "int8"}
    assert default_bar("vision", "fp32").to_dict() == {"max_rel_err": 1e-4}
    with pytest.raises(MraError, match=r"llm precision Q3_XX \| has no validation bar"):
        default_bar("llm", "Q3_XX")
    opts = SimpleNamespace(max_rel_err=1e-3, min_cosine={"int8": 0.9}, llm_thresholds={"Q4_0": {"kl_mean": 1.0}})
    assert vision_bar(opts, "fp32").to_dict() == {"max_rel_err": 1e-3}
    assert vision_bar(opts, "int8").to_dict() == {"min_cosine": 0.9}
    assert vision_bar(opts, "fp16") == DEFAULT_BARS["vision"]["fp16"]
    assert llm_bar(opts.llm_thresholds, "Q4_0").to_dict() == {"kl_mean": 1.0, "top1": DEFAULT_BARS["llm"]["Q4_0"]["top1"]}
    assert llm_bar(opts.llm_thresholds, "F32") == DEFAULT_BARS["llm"]["F32"]


def test_worst_image_cosine_shows_one_bad_image():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5, 8)).astype(np.float32)
    got = ref.copy()
    got[1] = -got[1]
    assert np.allclose(image_cosines(got, ref), [1.0, -1.0, 1.0])
    assert Threshold(min_worst_image_cosine=0.5).failures({"worst_image_cosine": -1.0})[0].got == -1.0
