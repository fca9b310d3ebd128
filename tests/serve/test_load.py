"""A bounded load test: 32 requests from 8 client threads on --parallel 2; every answer equals
the Pipeline's greedy answer for its photo and question, nothing fails, and both slots served.
(Throughput and latency are measured by benchmarks/serve_bench.py, not asserted here.)"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time

from serve_helpers import user_message

QUESTIONS = ["What is in the image?", "Describe it.", "What colour is it?", "Is it indoors?"]
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]


def test_32_requests_from_8_threads(client, reference, photo_paths, server):
    by_name = {p.name: p for p in photo_paths}
    cases = list(itertools.islice(itertools.cycle(itertools.product(PHOTOS, QUESTIONS)), 32))
    expected = {c: reference.ask(by_name[c[0]], c[1], max_tokens=10) for c in set(cases)}

    def one(case):
        name, question = case
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[user_message(question, by_name[name])], max_tokens=10, temperature=0,
            stream=False)
        return case, raw.parse().choices[0].message.content, raw.headers["x-mra-slot"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, cases))
    assert [answer for _, answer, _ in results] == [expected[c] for c, _, _ in results]
    slots = collections.Counter(slot for _, _, slot in results)
    assert set(slots) == {"0", "1"}  # both contexts served
    deadline = time.monotonic() + 30  # a slot is released just after its last event went out
    while server[1].gauges()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server[1].gauges()["busy_slots"] == 0
