"""Hostile prompt-cache folders: FIFOs, links to /dev/zero, huge junk and lying headers are
skipped at constant cost; a read-only folder is used read-only; partial files of killed writers
are removed at start and counted against the size bound; a server with a FIFO in its cache
answers and stops on SIGTERM or SIGINT."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hostile_helpers import BIN, FAST, ServeProcess, image_content, peak_rss_mb
from mra.runtime.prompt_cache import MAGIC, SUFFIX, PromptCache


def test_special_and_huge_entries_are_skipped_at_constant_cost(tiny_bundle, photo_paths, tmp_path):
    """The entry a prompt needs replaced by a FIFO, a link to /dev/zero, a 2 GB sparse junk file,
    a 2 GB file with the magic and a header that claims it all, and an entry whose header lies
    about its size; plus a FIFO and a /dev/zero link among the entries the eviction scans. Each
    answer equals the cache-less one, as a miss, in a child capped at 3 GB that must not hang."""
    cache = tmp_path / "cache"
    code = f"""
        import json, os, time
        from pathlib import Path
        from mra.runtime import Pipeline
        from mra.runtime.prompt_cache import MAGIC
        cache, image = Path({str(cache)!r}), {str(photo_paths[0])!r}
        with Pipeline.from_bundle({str(tiny_bundle)!r}, n_ctx=1024, n_threads=1) as plain:
            expected = plain.ask(image, "What?", max_tokens=4)
        with Pipeline.from_bundle({str(tiny_bundle)!r}, n_ctx=1024, n_threads=1, prompt_cache=cache,
                                  prompt_cache_bytes=1 << 30) as p:
            assert p.ask(image, "What?", max_tokens=4) == expected
            entry = next(cache.glob("*.mrakv"))
            good = entry.read_bytes()
            os.mkfifo(cache / "fifo.mrakv")
            (cache / "zero.mrakv").symlink_to("/dev/zero")

            def junk(f):
                f.write(b"junk")
                f.truncate(2 << 30)

            def claims_all(f):
                header = json.dumps({{"size": (2 << 30) - 100}}).encode()
                f.write(MAGIC + len(header).to_bytes(8, "little") + header)
                f.truncate(2 << 30)

            def header_lies(f):  # its header length says a terabyte
                f.write(good[:len(MAGIC)] + (1 << 40).to_bytes(8, "little") + good[len(MAGIC) + 8:])

            kinds = {{"fifo": lambda: os.mkfifo(entry), "zero": lambda: entry.symlink_to("/dev/zero")}}
            for name, fn in [("junk", junk), ("claims_all", claims_all), ("header_lies", header_lies)]:
                def make(fn=fn):
                    with open(entry, "wb") as f:
                        fn(f)
                kinds[name] = make
            for name, make in kinds.items():
                entry.unlink()
                make()
                p.ask(None, "Hi", max_tokens=1)  # the image prefix leaves the KV cache
                t0 = time.monotonic()
                assert p.ask(image, "What?", max_tokens=4) == expected, name
                assert p.timings.prompt_cache_misses == 1, name
                assert time.monotonic() - t0 < 30, name
                assert entry.is_file() and not entry.is_symlink() and entry.read_bytes()[:8] == MAGIC, name  # rewritten
        """
    mb = peak_rss_mb(code, cap_gib=3, timeout=240)
    assert mb < 1500, f"peak RSS {mb} MB"  # reading any of them whole takes 2 GB or never ends


def _run(args: list[str], root_drops_dac: bool) -> subprocess.CompletedProcess:
    """mra-run; as root without the capabilities that let root write anywhere (so that a folder's
    mode applies to it, as on a read-only file system)."""
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if root_drops_dac else []
    return subprocess.run([*prefix, str(BIN / "mra-run"), *args], capture_output=True, text=True, timeout=240)


def test_a_read_only_cache_folder_is_used_read_only(tiny_bundle, photo_paths, tmp_path):
    root = os.geteuid() == 0
    if root and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a folder's mode cannot make it read-only")
    cache = tmp_path / "cache"
    base = ["--bundle", str(tiny_bundle), "--prompt", "What?", "--json", "--prompt-cache", str(cache), *FAST]
    r = _run([*base, "--image", str(photo_paths[0])], False)  # fill it
    assert r.returncode == 0, r.stderr
    before = sorted(os.listdir(cache))
    cache.chmod(0o555)
    try:
        hit = _run([*base, "--image", str(photo_paths[0])], root)
        miss = _run([*base, "--image", str(photo_paths[1])], root)
    finally:
        cache.chmod(0o755)
    for r in (hit, miss):
        assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr
    assert json.loads(hit.stdout)["timings"]["prompt_cache_hits"] == 1
    assert json.loads(miss.stdout)["timings"]["prompt_cache_misses"] == 1
    assert "read-only" in miss.stderr
    assert sorted(os.listdir(cache)) == before  # nothing saved, nothing left behind


IDENTITY = {"model": "test"}


def _entry(folder: Path, key: str, size: int) -> Path:
    p = folder / f"{key}{SUFFIX}"
    p.write_bytes(MAGIC + b"\0" * (size - len(MAGIC)))
    return p


def test_partial_files_of_killed_writers_are_removed_at_start(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    stale = folder / f".{'a' * 64}{SUFFIX}.0123abcd.partial"
    stale.write_bytes(MAGIC + b"half an entry")
    empty = folder / f".{'b' * 64}{SUFFIX}.89abcdef.partial"  # killed before its first write
    empty.write_bytes(b"")
    foreign = folder / f".{'c' * 64}{SUFFIX}.0123abcd.partial"  # our naming, not our magic: not ours
    foreign.write_bytes(b"somebody else's data")
    other_name = folder / "notes.partial"
    other_name.write_bytes(MAGIC)
    live = folder / f".{'d' * 64}{SUFFIX}.fedcba98.partial"  # a writer still at work holds its lock
    with open(live, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.write(MAGIC)
        f.flush()
        PromptCache(folder, IDENTITY)
        assert not stale.exists() and not empty.exists()
        assert foreign.exists() and other_name.exists() and live.exists()


def test_partial_files_count_against_the_size_bound(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    cache = PromptCache(folder, IDENTITY, max_bytes=10_000)
    old = _entry(folder, "1" * 64, 4000)
    os.utime(old, (1, 1))  # least recently used
    new = _entry(folder, "2" * 64, 4000)
    live = folder / f".{'3' * 64}{SUFFIX}.00000000.partial"
    with open(live, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.write(MAGIC + b"\0" * 3000)
        f.flush()
        cache.evict()
    assert not old.exists() and new.exists() and live.exists()  # 4000 + 4000 + 3008 > 10000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_server_with_a_fifo_in_its_cache_answers_and_stops_on_a_signal(tiny_bundle, photo_paths, tmp_path, sig):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / "fifo.mrakv")  # scanned by the eviction after every save
    (cache / "zero.mrakv").symlink_to("/dev/zero")
    s = ServeProcess(tiny_bundle, "--prompt-cache", str(cache), "--timeout", "60")
    try:
        s.wait_ready()
        image = image_content(photo_paths[0].read_bytes(), "image/jpeg")
        for content in (image, "Hi", image):
            r = s.chat(content, timeout=60)
            assert r.status_code == 200, r.text
        assert len([p for p in cache.glob(f"*{SUFFIX}") if len(p.stem) == 64]) == 1  # the image prefix, saved
        t0 = time.monotonic()
        s.proc.send_signal(sig)
        s.proc.wait(20)
        assert time.monotonic() - t0 < 20
    finally:
        s.stop()


def test_a_hung_file_operation_costs_a_request_the_timeout_then_the_cache_is_skipped(tmp_path, monkeypatch):
    """A file system that hangs cannot be made here; an operation that blocks until released
    stands for it: the caller gets the default after IO_TIMEOUT_S, later operations get it at
    once while that one has not returned, and the cache works again once it has."""
    import threading

    import mra.runtime.prompt_cache as pc

    monkeypatch.setattr(pc, "IO_TIMEOUT_S", 0.3)
    cache = PromptCache(tmp_path / "cache", IDENTITY)
    release = threading.Event()
    t0 = time.monotonic()
    assert cache._io(release.wait, "default") == "default"
    assert 0.3 <= time.monotonic() - t0 < 2
    t0 = time.monotonic()
    assert cache._io(lambda: "ran", "skipped") == "skipped"  # the hung one is still running
    assert time.monotonic() - t0 < 0.1
    release.set()
    deadline = time.monotonic() + 5
    while cache._io(lambda: "ran", "skipped") != "ran":
        assert time.monotonic() < deadline
        time.sleep(0.01)
