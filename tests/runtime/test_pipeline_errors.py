"""Bad input gets one clear MraError, before any work where it can be known in advance, and
leaves the Pipeline usable: broken images, an overlong prompt, a broken bundle, a GGUF that
does not fit the projector."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest

from mra.core.files import sha256_file
from mra.core.manifest import Manifest
from mra.runtime import MraError, Pipeline


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid PNG header for a huge image with almost no data: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory, photo_paths) -> dict[str, Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    with Image.open(photo_paths[0]) as im:
        im.convert("RGB").save(d / "full.png")
        im.convert("RGB").save(d / "full.jpg", quality=90)
    out = {"missing": d / "missing.png", "empty": d / "empty.jpg", "text": d / "notes.png",
           "bomb": png_claiming(d / "bomb.png", 20000, 20000)}
    out["empty"].write_bytes(b"")
    out["text"].write_text("this is not an image\n")
    for ext in ("png", "jpg"):
        data = (d / f"full.{ext}").read_bytes()
        out[f"truncated_{ext}"] = d / f"truncated.{ext}"
        out[f"truncated_{ext}"].write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("kind,words", [("missing", "not found"), ("empty", "empty"), ("text", "not an image"),
                                        ("bomb", "decompression bomb"), ("truncated_png", "truncated"),
                                        ("truncated_jpg", "truncated")])
def test_bad_image_is_one_clear_error(pipe, bad_images, photo_paths, kind, words):
    path = bad_images[kind]
    with pytest.raises(MraError, match=words) as e:
        pipe.ask(path, "What is it?", max_tokens=2)
    assert path.name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MraError, match=words):
        pipe.chat(path).ask("What is it?", max_tokens=2)
    assert isinstance(pipe.ask(photo_paths[0], "What is it?", max_tokens=2), str)  # still usable


def test_overlong_prompt_is_refused_before_running(pipe, photo_paths):
    evaluated = pipe.llm.evaluated_total
    question = "Describe every detail, " * (pipe.llm.n_ctx // 4)  # 5 tokens each: past the context
    with pytest.raises(MraError, match=rf"\+ 576 image tokens \(1 x 576\) = \d+ positions, but the context holds "
                                       rf"{pipe.llm.n_ctx}"):
        pipe.ask(photo_paths[0], question, stream=True)  # refused at the call, not while streaming
    chat = pipe.chat(photo_paths[0])
    with pytest.raises(MraError, match=f"context holds {pipe.llm.n_ctx}"):
        chat.ask(question)
    assert pipe.llm.evaluated_total == evaluated
    assert chat.history == []  # the refused turn is not kept
    with pytest.raises(MraError, match="max_tokens"):
        pipe.ask(photo_paths[0], "Hi", max_tokens=0)


def test_generation_stops_at_a_full_context(tiny_bundle, photo_paths):
    with Pipeline.from_bundle(tiny_bundle, n_ctx=600, n_threads=1) as p:
        p.ask(photo_paths[0], "Hi", max_tokens=500, ignore_eos=True)
        assert p.llm.n_ctx < p.timings.prompt_positions + 500  # llama.cpp may round n_ctx up (to 768 here)
        assert p.timings.prompt_positions + p.timings.generated == p.llm.n_ctx + 1  # the last one is not evaluated


def _copy(bundle: Path, tmp_path: Path) -> tuple[Path, Manifest]:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst, Manifest.load(dst)


def _file(m: Manifest, kind: str) -> str:
    return next(a.file for a in m.artifacts if a.kind == kind)


def test_missing_truncated_or_corrupt_bundle_files(tiny_bundle, tmp_path):
    b, m = _copy(tiny_bundle, tmp_path)
    gguf, onnx = b / _file(m, "llm"), b / _file(m, "vision")

    data = gguf.read_bytes()
    gguf.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte changed
    with pytest.raises(MraError, match="sha256"):
        Pipeline.from_bundle(b)
    Pipeline.from_bundle(b, verify_hash=False, n_ctx=1024).close()  # the opt-out for huge files checks size only

    gguf.write_bytes(data[:1000])
    with pytest.raises(MraError, match="truncated"):
        Pipeline.from_bundle(b, verify_hash=False)
    onnx.unlink()
    with pytest.raises(MraError, match="missing"):
        Pipeline.from_bundle(b)
    (b / "mra.json").unlink()
    with pytest.raises(MraError, match="not a bundle"):
        Pipeline.from_bundle(b)
    with pytest.raises(MraError, match="not a directory"):
        Pipeline.from_bundle(tmp_path / "nowhere")


def test_unloadable_gguf_and_wrong_width(tiny_bundle, tmp_path):
    b, m = _copy(tiny_bundle, tmp_path)
    art = next(a for a in m.artifacts if a.kind == "llm")
    with pytest.raises(MraError, match="llm_quant"):
        Pipeline.from_bundle(b, llm_quant="Q2_K")

    m.embed_dim = 2 * m.embed_dim  # a projector for another LLM
    m.save(b)
    with pytest.raises(MraError, match=r"embedding width is \d+, the vision projector outputs"):
        Pipeline.from_bundle(b, n_ctx=1024)

    (b / art.file).write_bytes(b"GGUF" + b"\0" * 100)  # recorded as if genuine: llama.cpp itself refuses it
    art.size, art.sha256 = (b / art.file).stat().st_size, sha256_file(b / art.file)
    m.save(b)
    with pytest.raises(MraError, match="llama.cpp cannot load it"):
        Pipeline.from_bundle(b)
