"""The public vision encoder: images that threads submit while the backend runs go through it
together as one batch over the graph's batch axis, each getting the rows it gets alone."""

from __future__ import annotations

import threading

import numpy as np

from mra.core.manifest import Manifest
from mra.runtime.vision_encoder import VisionEncoder


class _Recording:
    """The real runner, recording batch sizes; its first run waits until ``release`` is set."""

    def __init__(self, runner):
        self.runner, self.batches, self.release, self.entered = runner, [], threading.Event(), threading.Event()

    def infer(self, x):
        self.batches.append(len(x))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(60)
        return self.runner.infer(x)

    def __exit__(self, *exc):
        return self.runner.__exit__(*exc)


def test_concurrent_images_run_as_one_batch_with_the_rows_each_gets_alone(tiny_bundle, photo_paths):
    manifest = Manifest.load(tiny_bundle)
    enc = VisionEncoder.from_bundle(manifest, tiny_bundle, threads=1, cache=0)
    try:
        alone = [enc.encode(p).rows for p in photo_paths[:3]]
        size = enc.sizes.largest.size
        rec = enc.sizes.runners[size] = _Recording(enc.sizes.runners[size])
        got: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda i=i: got.setdefault(i, enc.encode(photo_paths[i]).rows))
                   for i in range(3)]
        threads[0].start()
        assert rec.entered.wait(60)  # image 0 is running alone; 1 and 2 arrive meanwhile
        threads[1].start(), threads[2].start()
        while len(enc._waiting) < 2:
            threading.Event().wait(0.01)
        rec.release.set()
        for t in threads:
            t.join(60)
        assert rec.batches == [1, 2]
        for i in range(3):
            np.testing.assert_allclose(got[i], alone[i], rtol=0, atol=1e-5)
    finally:
        enc.close()


def test_an_image_being_encoded_is_waited_for_not_encoded_again(tiny_bundle, photo_paths):
    from mra.runtime.pipeline import Timings

    manifest = Manifest.load(tiny_bundle)
    enc = VisionEncoder.from_bundle(manifest, tiny_bundle, threads=1, cache=0)  # no cache: only the wait can share
    try:
        size = enc.sizes.largest.size
        rec = enc.sizes.runners[size] = _Recording(enc.sizes.runners[size])
        got, timings = {}, {i: Timings() for i in range(3)}
        threads = [threading.Thread(target=lambda i=i: got.setdefault(i, enc.encode(photo_paths[0], timings[i])))
                   for i in range(3)]
        threads[0].start()
        assert rec.entered.wait(60)  # the photo is in the graph; two more requests for it arrive
        threads[1].start(), threads[2].start()
        while not all(t.is_alive() for t in threads[1:]):
            threading.Event().wait(0.01)
        threading.Event().wait(0.2)
        rec.release.set()
        for t in threads:
            t.join(60)
        assert rec.batches == [1]  # one run of the graph for three requests
        assert got[1].rows is got[0].rows and got[2].rows is got[0].rows
        assert [timings[i].images_encoded for i in range(3)] == [1, 0, 0]
        assert enc._encoding == {}
        again = enc.encode(photo_paths[0])  # nothing cached, nothing in flight: encoded anew
        assert rec.batches == [1, 1] and again.rows is not got[0].rows
        np.testing.assert_array_equal(again.rows, got[0].rows)
    finally:
        enc.close()


class _Broken:
    def infer(self, x):
        raise RuntimeError("backend lost")


def test_a_failed_encoding_fails_every_request_waiting_for_it_and_is_not_kept(tiny_bundle, photo_paths):
    manifest = Manifest.load(tiny_bundle)
    enc = VisionEncoder.from_bundle(manifest, tiny_bundle, threads=1, cache=4)
    try:
        size = enc.sizes.largest.size
        real = enc.sizes.runners[size]
        rec = enc.sizes.runners[size] = _Recording(real)
        rec.runner = _Broken()
        errors = {}

        def ask(i):
            try:
                enc.encode(photo_paths[0])
            except RuntimeError as e:
                errors[i] = str(e)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        threads[0].start()
        assert rec.entered.wait(60)
        threads[1].start()
        threading.Event().wait(0.2)  # the second request is waiting for the first's rows
        rec.release.set()
        for t in threads:
            t.join(60)
        assert errors == {0: "backend lost", 1: "backend lost"} and rec.batches == [1]
        assert enc._encoding == {} and len(enc.cache) == 0
        enc.sizes.runners[size] = real  # the next request encodes anew
        assert enc.encode(photo_paths[0]).rows.shape == (enc.sizes.largest.rows, enc.embed_dim)
    finally:
        enc.close()
