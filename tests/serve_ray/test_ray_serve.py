"""`mra-serve --ray` on a local Ray instance (127.0.0.1, two LLM replicas, the tiny bundle),
through the official `openai` client: greedy answers equal Pipeline.ask's; 16 concurrent
requests are answered correctly by both replicas with images batched in the vision deployment;
a follow-up turn lands on its conversation's replica; a replica killed mid-answer gives that
client a retryable error (503 + Retry-After, or an error event when streaming: never [DONE])
and later requests succeed; SIGTERM leaves no Ray process behind.

The tests share one server and run in file order: the fault tests come after the parity
tests, and the shutdown test is last.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

CASES = [("astronaut.png", "What is in the image?"), ("coffee.png", "What colour is the cup?")]
LONG = ("hubble_deep_field.jpg", "Describe the image.")  # greedy: thousands of tokens before any EOS
N_TOKENS = 8


def user(text: str, image: Path | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def client(ray_server):
    return openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, messages, max_tokens=N_TOKENS, **kw):
    """(answer, replica, vision batch) of one greedy, non-streamed request."""
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                           temperature=0, **kw)
    r = raw.parse()
    return r.choices[0].message.content, raw.headers["x-mra-replica"], raw.headers.get("x-mra-vision-batch")


def replica_pid(name: str) -> int:
    return int(name.rsplit(":", 1)[1])  # <replica id>@<host>:<pid>


@pytest.mark.parametrize("name,question", CASES)
def test_greedy_answers_equal_the_pipeline(client, reference, photo, name, question):
    expected = reference.ask(photo(name), question, max_tokens=N_TOKENS)
    text, replica, _ = ask(client, [user(question, photo(name))])
    assert text == expected and replica
    stream = client.chat.completions.create(model="tiny", messages=[user(question, photo(name))],
                                            max_tokens=N_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_text_only_and_follow_up_turn(client, reference, photo):
    assert ask(client, [user("Say something.")])[0] == reference.ask(None, "Say something.", max_tokens=N_TOKENS)
    image = photo("chelsea.png")
    chat = reference.chat(image)
    first = chat.ask("What is in the image?", max_tokens=N_TOKENS)
    second = chat.ask("And the colours?", max_tokens=N_TOKENS)
    got1, replica1, _ = ask(client, [user("What is in the image?", image)])
    got2, replica2, batch2 = ask(client, [user("What is in the image?", image), {"role": "assistant", "content": got1},
                                          user("And the colours?")])
    assert (got1, got2) == (first, second)
    assert replica2 == replica1  # routed by the image: its KV prefix is there
    assert batch2 == "0"  # the image's embeddings came from the vision replica's cache


def test_images_pass_the_same_gate_under_ray(client, photo, tmp_path):
    """A format outside the runtime's list is refused by the request parser, and an image whose
    header is sound but whose pixels end early fails where the vision deployment decodes it: a
    400 each, never a lost replica."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PCX")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    data = photo("coffee.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, message in [("x.png", "not an image file PIL can read"), ("cut.png", "cannot decode")]:
        with pytest.raises(openai.BadRequestError, match=message):
            ask(client, [user("What?", tmp_path / name)])
    assert ask(client, [user("Hi")])[0] is not None


def test_llm_replicas_share_the_prompt_cache(ray_server):
    folder = Path(ray_server.args[ray_server.args.index("--prompt-cache") + 1])
    assert list(folder.glob("*.mrakv"))  # the image prefixes above were saved (and answers still equal)


def test_16_concurrent_requests_use_both_replicas_and_batch_images(client, reference, photo_paths):
    jobs = [(photo_paths[i % 8], f"Question {i}: what is it?") for i in range(16)]
    expected = [reference.ask(p, q, max_tokens=N_TOKENS) for p, q in jobs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: ask(client, [user(j[1], j[0])]), jobs))
    assert [g[0] for g in got] == expected
    assert len({g[1] for g in got}) == 2  # both replicas answered
    assert max(int(g[2]) for g in got) > 1  # images of different requests ran as one vision batch


def test_replica_killed_mid_stream_ends_with_an_error_event(client, reference, photo):
    name, question = LONG
    with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[user(question, photo(name))], max_tokens=3000, temperature=0,
            stream=True) as r:
        pid = replica_pid(r.headers["x-mra-replica"])
        chunks = r.parse()
        next(chunks), next(chunks)  # the role chunk, then the first text: generation is under way
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="replica lost"):
            for _ in chunks:  # a truncated answer never ends with finish_reason and [DONE]
                pass
    _recovers(client, photo)


def test_replica_killed_mid_request_gives_503_with_retry_after(client, photo):
    import psutil

    name, question = LONG
    _, replica, _ = ask(client, [user(question, photo(name))], max_tokens=1)  # this image's replica
    proc = psutil.Process(replica_pid(replica))
    busy = sum(proc.cpu_times()[:2])
    result: dict = {}

    def long_request():
        try:
            result["ok"] = ask(client, [user(question, photo(name))], max_tokens=3000)
        except openai.APIStatusError as e:
            result["error"] = e

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while sum(proc.cpu_times()[:2]) < busy + 0.1 and time.monotonic() < deadline:  # it is decoding
        time.sleep(0.01)
    proc.kill()
    t.join(60)
    e = result.get("error")
    assert e is not None, f"the request was not cut: {result}"
    assert e.status_code == 503 and int(e.response.headers["retry-after"]) > 0
    assert e.body["code"] == "replica_lost"
    _recovers(client, photo)


def _recovers(client, photo):
    """The other replica serves at once; Ray restarts the dead one (a new replica answers).
    Requests are routed by image, so the check asks about many distinct drawn images: with
    the four bundled photos, all four hashed to one replica in about one run of eight."""
    import tempfile

    import numpy as np
    from PIL import Image

    retrying = client.with_options(max_retries=5)  # the openai client honours Retry-After
    assert ask(retrying, [user(CASES[0][1], photo(CASES[0][0]))])[0]
    seen: set[str] = set()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        drawn = []
        for i in range(16):
            path = Path(d) / f"drawn{i}.png"
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
            drawn.append(path)
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            for path in drawn:
                seen.add(ask(retrying, [user("Again?", path)])[1])
    assert len(seen) == 2, f"only {seen} answer after a replica was killed"


def alive(pids: set[int]) -> list[str]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_leaves_no_ray_process(ray_server):
    pids = ray_server.ray_pids()
    assert len(pids) >= 6, pids  # gcs, raylet, controller, proxy, replicas: the instance it started
    assert ray_server.stop(signal.SIGTERM) == 0, ray_server.tail()
    deadline = time.monotonic() + 30
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(pids)
