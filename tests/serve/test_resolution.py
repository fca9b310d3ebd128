"""mra-serve on a bundle of three input sizes, through the official `openai` client:
image_url.detail low / high pick the smallest / largest size, auto the server's default
budget, the max_image_tokens extension field its own; usage and /metrics report the choice,
and each answer equals the Pipeline's at that size."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import API_KEY, PIPE_KW, ServerThread, data_url, wait_ready

from mra.runtime import Pipeline

DEFAULT_BUDGET = 576  # the server-wide default: 768 (576 rows) unless a request says otherwise
Q = "What is in the image?"


def open_pipeline(bundle, parallel: int = 1):
    return Pipeline.from_bundle(bundle, **PIPE_KW, parallel=parallel, max_image_tokens=DEFAULT_BUDGET)


@pytest.fixture(scope="module")
def server3(tiny_sizes_bundle):
    from mra.serve import LocalBackend, ServerSettings, build_app

    backend = LocalBackend(lambda n: open_pipeline(tiny_sizes_bundle, parallel=n), 1, 8, "tiny3")
    with ServerThread(build_app(backend, ServerSettings(api_key=API_KEY))) as s:
        wait_ready(s.url)
        yield s.url


@pytest.fixture(scope="module")
def client3(server3):
    from openai import OpenAI

    return OpenAI(base_url=f"{server3}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref3(tiny_sizes_bundle):
    with Pipeline.from_bundle(tiny_sizes_bundle, **PIPE_KW) as p:
        yield p


def message(image, detail=None) -> dict:
    url = {"url": data_url(image), **({"detail": detail} if detail else {})}
    return {"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": Q}]}


@pytest.mark.parametrize("detail,extra,size", [("low", None, 384), ("high", None, 1024), ("auto", None, 768),
                                               (None, None, 768), (None, 1024, 1024), ("auto", 600, 768)])
def test_detail_and_max_image_tokens_choose_the_size(client3, ref3, photo_paths, detail, extra, size):
    img = photo_paths[1]
    expected = ref3.ask(img, Q, max_tokens=8, max_image_tokens={384: 576, 768: 576, 1024: 1024}[size],
                        detail="low" if size == 384 else None)
    assert ref3.timings.image_size == size
    r = client3.chat.completions.create(model="tiny3", messages=[message(img, detail)], max_tokens=8, temperature=0,
                                        extra_body={"max_image_tokens": extra} if extra else None)
    assert r.choices[0].message.content == expected
    usage = r.usage.model_dump()
    assert usage["image_size"] == size and usage["image_tokens"] == (1024 if size == 1024 else 576)
    assert r.usage.prompt_tokens == ref3.timings.prompt_positions


def test_bad_budgets_are_400_and_metrics_count_sizes(client3, server3, photo_paths):
    import openai

    with pytest.raises(openai.BadRequestError, match="576 rows"):
        client3.chat.completions.create(model="tiny3", messages=[message(photo_paths[1])], max_tokens=2,
                                        extra_body={"max_image_tokens": 10})
    with pytest.raises(openai.BadRequestError, match="detail"):
        client3.chat.completions.create(model="tiny3", messages=[message(photo_paths[1], "medium")], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_image_tokens"):
        client3.chat.completions.create(model="tiny3", messages=[message(photo_paths[1])], max_tokens=2,
                                        extra_body={"max_image_tokens": "many"})
    before = _images(server3)
    client3.chat.completions.create(model="tiny3", messages=[message(photo_paths[2], "low")], max_tokens=2)
    client3.chat.completions.create(model="tiny3", messages=[message(photo_paths[2], "high")], max_tokens=2)
    after = _images(server3)
    assert after.get("384", 0) - before.get("384", 0) == 1 and after.get("1024", 0) - before.get("1024", 0) == 1


def _images(url: str) -> dict[str, int]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return {line.split('"')[1]: int(line.split()[-1]) for line in text.splitlines()
            if line.startswith("mra_images_total{")}


def test_mra_serve_default_budget_flags(tiny_sizes_bundle, photo_paths):
    from mra.serve.cli import open_pipeline as serve_pipeline
    from mra.serve.cli import parser

    a = parser().parse_args(["--bundle", str(tiny_sizes_bundle), "--n-ctx", "2048", "--threads", "1",
                             "--max-image-tokens", "576", "--vision-budget-ms", "1e6"])
    with serve_pipeline(a) as p:
        assert p.default_budget == (576, 1e6)
        p.encode_image(photo_paths[1])
        assert p.timings.image_size == 768  # no budget in the call: the server's
        p.encode_image(photo_paths[1], max_image_tokens=1024)
        assert p.timings.image_size == 1024
