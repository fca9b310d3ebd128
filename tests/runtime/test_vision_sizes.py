"""Resolution as a run-time budget: ``choose_size`` picks the largest size whose rows and
recorded latency fit; the Pipeline, mra-run and mra-chat run the image at that size, and the
embeddings and greedy answers equal a one-size bundle's at that size."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mra.core.errors import LimitExceeded, MraError
from mra.core.manifest import Artifact, Manifest
from mra.runtime import Pipeline
from mra.runtime.cli import chat_main, run_main
from mra.runtime.vision_sizes import ImageSize, choose_size

KW = dict(n_ctx=2048, n_threads=1)
Q = "What is it?"


def sizes(*spec) -> list[ImageSize]:
    a = Artifact("x", "vision", "onnx", "fp32", 0, "")
    return [ImageSize(s, r, ms, None, a) for s, r, ms in spec]


def test_choose_size_is_the_largest_that_fits():
    table = sizes((384, 576, 40.0), (768, 576, 90.0), (1024, 1024, 150.0))
    pick = lambda **kw: choose_size(table, **kw).size  # noqa: E731
    assert pick() == 1024
    assert pick(max_image_tokens=1024) == 1024 and pick(max_image_tokens=1023) == 768
    assert pick(max_image_tokens=576) == 768  # 384 and 768 cost the LLM the same rows
    assert pick(vision_budget_ms=100) == 768 and pick(vision_budget_ms=50) == 384
    assert pick(max_image_tokens=2000, vision_budget_ms=40) == 384
    assert pick(detail="low") == 384 and pick(detail="high", max_image_tokens=576) == 1024
    assert pick(detail="auto", max_image_tokens=600) == 768
    with pytest.raises(LimitExceeded, match="576 rows"):
        pick(max_image_tokens=100)
    with pytest.raises(LimitExceeded):
        pick(vision_budget_ms=10)
    for bad in (dict(max_image_tokens=0), dict(max_image_tokens=1.5), dict(vision_budget_ms=float("nan")),
                dict(vision_budget_ms=-1), dict(detail="medium")):
        with pytest.raises(MraError):
            pick(**bad)
    # a size without a recorded latency fits any time budget; one size: that one, whatever the budget
    assert choose_size(sizes((384, 576, None), (1024, 1024, None)), vision_budget_ms=1).size == 1024
    assert choose_size(sizes((1024, 1024, 150.0)), max_image_tokens=10, vision_budget_ms=1).size == 1024


@pytest.fixture(scope="module")
def pipe3(tiny_sizes_bundle):
    with Pipeline.from_bundle(tiny_sizes_bundle, **KW) as p:
        yield p


@pytest.fixture(scope="module")
def single(tiny_ckpt, tiny_bundle, tmp_path_factory):
    """One-size bundles at 384 (the shared tiny bundle), 768 and 1024: the references."""
    from mra.export.bundle import ExportOptions, export

    out = {384: tiny_bundle}
    for s in (768, 1024):
        out[s] = export(ExportOptions(out=tmp_path_factory.mktemp(f"b{s}") / "b", model=tiny_ckpt, image_size=s,
                                      precisions=["fp32"], llm_quants=["F32"], progress=False))
    return out


@pytest.mark.parametrize("budget,size", [(dict(), 1024), (dict(max_image_tokens=1000), 768),
                                         (dict(detail="low"), 384)])
def test_pipeline_equals_a_one_size_bundle_at_the_chosen_size(pipe3, single, photo_paths, budget, size):
    img = photo_paths[1]
    got = pipe3.encode_image(img, **budget)
    assert pipe3.timings.image_size == size
    got_answer = pipe3.ask(img, Q, max_tokens=8, **budget)
    t = pipe3.timings
    assert t.image_size == size and t.image_rows == (1024 if size == 1024 else 576)
    with Pipeline.from_bundle(single[size], **KW) as p1:
        ref = p1.encode_image(img)
        assert p1.ask(img, Q, max_tokens=8) == got_answer  # end-to-end greedy answers equal
        assert t.prompt_positions == p1.timings.prompt_positions
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()  # FP32 within 1e-5 relative


def test_a_chat_keeps_its_budget_and_turns_may_differ(pipe3, photo_paths):
    chat = pipe3.chat(photo_paths[2], max_image_tokens=576)
    chat.ask(Q, max_tokens=4)
    assert pipe3.timings.image_size == 768 and pipe3.timings.prompt_positions > 576
    chat.ask("And this one?", image=photo_paths[3], max_tokens=4, max_image_tokens=1024)
    t = pipe3.timings
    assert t.image_size == 1024 and t.reused >= 576 and t.prompt_positions > 576 + 1024  # both images held
    with pytest.raises(LimitExceeded):
        pipe3.chat(max_image_tokens=10).ask(Q, image=photo_paths[2], max_tokens=4)
    with pytest.raises(MraError):
        pipe3.chat(vision_budget_ms=0)


def test_one_size_bundle_ignores_the_budget(tiny_bundle, photo_paths):
    with Pipeline.from_bundle(tiny_bundle, **KW) as p:
        a = p.encode_image(photo_paths[1])
        b = p.encode_image(photo_paths[1], max_image_tokens=10, vision_budget_ms=0.001)
        assert np.array_equal(a, b) and p.timings.image_cache_hits == 1 and p.timings.image_size == 384


def test_mra_run_chooses_by_budget(tiny_sizes_bundle, photo_paths, pipe3, capsys):
    expected = pipe3.ask(photo_paths[1], Q, max_tokens=6, max_image_tokens=600)
    args = ["--bundle", str(tiny_sizes_bundle), "--image", str(photo_paths[1]), "--prompt", Q, "--n-ctx", "2048",
            "--threads", "1", "--max-tokens", "6"]
    assert run_main([*args, "--max-image-tokens", "600", "--timings"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "image 768 (576 rows)" in err
    assert run_main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["timings"]["image_size"] == 1024
    assert run_main([*args, "--max-image-tokens", "100"]) != 0
    assert "576 rows" in capsys.readouterr().err
    m = Manifest.load(tiny_sizes_bundle)
    latency = {s: m.vision_at(s)[0].info.latency_ms(1) for s in m.sizes}  # as the export measured them
    budget = latency[384]
    assert run_main([*args, "--json", "--vision-budget-ms", str(budget)]) == 0
    assert json.loads(capsys.readouterr().out)["timings"]["image_size"] == max(s for s in m.sizes
                                                                               if latency[s] <= budget)


def test_mra_chat_chooses_by_budget(tiny_sizes_bundle, photo_paths, pipe3, monkeypatch, capsys):
    expected = pipe3.chat(photo_paths[2], max_image_tokens=576).ask(Q, max_tokens=6)
    monkeypatch.setattr("sys.stdin", io.StringIO(Q + "\n"))
    rc = chat_main(["--bundle", str(tiny_sizes_bundle), "--image", str(photo_paths[2]), "--n-ctx", "2048",
                    "--threads", "1", "--max-tokens", "6", "--max-image-tokens", "576", "--timings"])
    out, err = capsys.readouterr()
    assert rc == 0 and expected in out and "image 768 (576 rows)" in err


def test_a_context_smaller_than_the_largest_image_keeps_the_sizes_that_fit(tiny_sizes_bundle, photo_paths):
    with Pipeline.from_bundle(tiny_sizes_bundle, n_ctx=1024, n_threads=1) as p:
        p.ask(photo_paths[1], Q, max_tokens=2)
        assert p.timings.image_size == 768  # 1024 rows would fill the context
        with pytest.raises(MraError, match="context holds"):
            p.ask(photo_paths[1], Q, max_tokens=2, detail="high")
    with pytest.raises(MraError, match="cannot hold one image"):
        Pipeline.from_bundle(tiny_sizes_bundle, n_ctx=512, n_threads=1)
