"""Exports never delete what they did not write, hold their output location exclusively, and
leave one complete bundle at every instant, whatever kills them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostile_helpers import BIN, S, vision_only
from mra.core.errors import MraError
from mra.core.manifest import Manifest
from mra.export import bundle as bundle_mod
from mra.export.bundle import export
from mra.export.out_folder import output_lock, recover


def mra_export(args: list[str], capsys) -> tuple[int, str]:
    """mra-export in this process (argparse errors exit 2): (exit code, stderr)."""
    from mra.export.cli import main

    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_ckpt, tmp_path_factory) -> Path:
    """A finished vision-only bundle, copied by the tests that replace one."""
    return export(vision_only(tmp_path_factory.mktemp("fin") / "b", tiny_ckpt))


def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- case 1: --force replaces only a bundle or an empty folder --------------------------------
@pytest.mark.parametrize("where", ["is", "inside", "parent"])
def test_out_and_model_overlap_is_refused_and_nothing_touched(tiny_ckpt, tmp_path, where, capsys):
    import shutil

    model = shutil.copytree(tiny_ckpt, tmp_path / "parent" / "ckpt")
    out = {"is": model, "inside": model / "bundle", "parent": tmp_path / "parent"}[where]
    before = tree(tmp_path)
    rc, err = mra_export(["--model", str(model), "--out", str(out), "--force", "--image-size", str(S),
                          "--llm-quant", "none"], capsys)
    assert rc == 1 and "the checkpoint folder" in err and len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_force_refuses_a_folder_that_is_not_a_bundle(tiny_ckpt, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"my photo")
    with pytest.raises(MraError, match="not a finished bundle"):
        export(vision_only(out, tiny_ckpt, force=True))
    assert tree(out) == {"holiday.jpg": b"my photo"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no partial, no lock left


def test_force_refuses_a_bundle_with_a_foreign_file(finished, tiny_ckpt, tmp_path):
    out = copy_bundle(finished, tmp_path / "b")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(MraError, match="not a finished bundle"):
        export(vision_only(out, tiny_ckpt, force=True))
    assert tree(out) == before


def test_out_a_file_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "bundle"
    out.write_text("a file")
    with pytest.raises(MraError, match="not a folder"):
        export(vision_only(out, tiny_ckpt, force=True))
    assert out.read_text() == "a file"


def test_force_replaces_a_finished_bundle_by_a_swap(finished, tiny_ckpt, tmp_path, caplog):
    out = copy_bundle(finished, tmp_path / "b")
    old_files = {p.name: p.stat().st_ino for p in out.iterdir()}
    export(vision_only(out, tiny_ckpt, force=True))
    new_files = {p.name: p.stat().st_ino for p in out.iterdir()}
    assert new_files.keys() == old_files.keys()
    assert all(new_files[n] != old_files[n] for n in new_files)  # every file is the new export's
    Manifest.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .old, .partial or .lock left


# --- case 2: one export per output, and a re-check before the final rename -----------------------
def test_a_second_export_fails_at_once_naming_the_first(tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mra.export.out_folder import output_lock
        with output_lock(Path({str(out)!r})):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run([str(BIN / "mra-export"), "--model", str(tiny_ckpt), "--out", str(out),
                            "--image-size", str(S), "--llm-quant", "none"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"pid {holder.pid}" in r.stderr and "another export" in r.stderr
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder: the kernel drops its lock
        holder.wait()
    with output_lock(out):  # nothing blocks after the holder died
        pass


def test_a_lock_path_this_tool_did_not_write_is_left_alone(tmp_path):
    """A link at .NAME.lock (to a user's file) or a file there with other content: refused,
    neither truncated nor removed; a lock file a killed export left is taken over."""
    out = tmp_path / "b"
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    lock = tmp_path / ".b.lock"
    lock.symlink_to(precious)
    with pytest.raises(MraError, match="a link or not a file"):
        with output_lock(out):
            pass
    assert lock.is_symlink() and precious.read_text() == "keep me"
    lock.unlink()
    lock.write_text("someone's own file")
    with pytest.raises(MraError, match="not written by mra-export"):
        with output_lock(out):
            pass
    assert lock.read_text() == "someone's own file"
    lock.write_text("pid 999999: mra-export --model m --out b")  # left by a killed export
    with output_lock(out):
        assert lock.read_text().startswith(f"pid {os.getpid()}:")
    assert not lock.exists()
    with output_lock(out):  # a file moved to the lock's path while it is held is not removed with it
        (tmp_path / "moved").write_text("moved here by someone else")
        os.replace(tmp_path / "moved", lock)
    assert lock.read_text() == "moved here by someone else"


def test_a_file_put_into_out_during_the_export_is_kept(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b"
    real_build = bundle_mod._build

    def build_then_meddle(opts, work, manifest):
        real_build(opts, work, manifest)
        out.mkdir()
        (out / "precious.txt").write_text("put here by someone else")

    monkeypatch.setattr(bundle_mod, "_build", build_then_meddle)
    with pytest.raises(MraError, match="changed during the export"):
        export(vision_only(out, tiny_ckpt))
    assert tree(out) == {"precious.txt": b"put here by someone else"}


# --- case 3: a crash at any point leaves one complete bundle; the next export recovers -------------
def test_crash_between_the_renames_is_recovered(finished, tmp_path, caplog):
    out = tmp_path / "b"
    aside = copy_bundle(finished, tmp_path / ".b.old-x1y2")  # old set aside, new one never arrived
    before = tree(aside)
    recover(out)
    assert tree(out) == before and not aside.exists()
    assert "restored" in caplog.text


def test_crash_after_the_swap_removes_the_old_bundle(finished, tmp_path, caplog):
    out = copy_bundle(finished, tmp_path / "b")
    copy_bundle(finished, tmp_path / ".b.old-abcd")
    recover(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and "removed" in caplog.text


def test_sigkill_during_an_export_leaves_a_partial_the_next_export_removes(tiny_ckpt, tmp_path, caplog):
    out = tmp_path / "b"
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import mra.export.bundle as b
        from mra.export.bundle import export
        from mra.export.options import ExportOptions
        b._build = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-export
        export(ExportOptions(out=Path({str(out)!r}), model=Path({str(tiny_ckpt)!r}), image_size={S},
                             precisions=["fp32"], llm_quants=[], progress=False))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    partials = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(partials) == 1 and not out.exists()
    stranger = tmp_path / ".b.partial-mine"  # a user's folder that merely looks like ours
    stranger.mkdir()
    (stranger / "keep.txt").write_text("x")
    export(vision_only(out, tiny_ckpt))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.partial-mine", "b"]
    assert partials[0] in caplog.text and "removed" in caplog.text


def test_interrupt_while_replacing_keeps_the_old_bundle(finished, tiny_ckpt, tmp_path, monkeypatch):
    out = copy_bundle(finished, tmp_path / "b")
    before = tree(out)
    real_rename = os.rename
    calls = []

    def rename(src, dst):  # Ctrl-C right after the old bundle went aside
        real_rename(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        export(vision_only(out, tiny_ckpt, force=True))
    monkeypatch.setattr(bundle_mod.os, "rename", real_rename)
    aside = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert not out.exists() and len(aside) == 1 and tree(aside[0]) == before  # complete, at a named side path
    recover(out)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --- case 11: option and input errors before the first heavy step ---------------------------------
def test_missing_tokenizer_fails_before_the_vision_export(tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    from mra.export import onnx_export
    from mra.export.options import ExportOptions

    model = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (model / "tokenizer.model").unlink()
    ran = []
    monkeypatch.setattr(onnx_export, "export_vision_onnx", lambda *a: ran.append(a))
    with pytest.raises(MraError, match="tokenizer.model"):
        export(ExportOptions(out=tmp_path / "b", model=model, image_size=S, precisions=["fp32"],
                             llm_quants=["Q8_0"], progress=False))
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("args, message", [
    (["--llm-quant", "none,Q8_0"], "cannot be combined"),
    (["--image-size", "0"], "expected a positive integer"),
    (["--image-size", "-32"], "expected a positive integer"),
    (["--image-size", "400"], "multiple of 32"),
    (["--calib-count", "0"], "positive integer"),
    (["--min-cosine", "nan"], "--min-cosine"),
    (["--max-rel-err", "inf"], "finite"),
    (["--precision", "int8", "--calib-images", "/no/such/folder"], "no such folder"),
])
def test_option_errors_are_one_line_before_any_work(tiny_ckpt, tmp_path, args, message, capsys):
    rc, err = mra_export(["--model", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--llm-quant", "none", *args],
                         capsys)
    assert rc in (1, 2) and message in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_image_size_zero_is_an_error_in_the_library(tiny_ckpt, tmp_path):
    from mra.export.source import describe_source

    with pytest.raises(MraError, match="positive multiple of 32"):
        describe_source(tiny_ckpt, 0)
    with pytest.raises(MraError, match="positive multiple of 32"):
        describe_source(tiny_ckpt, -32)


def test_a_full_disk_is_reported_as_such(tiny_ckpt, tmp_path, monkeypatch):
    """Whatever shape the failure takes (a library reading back its truncated file says "Wire
    format was corrupt"), a failure with the disk (nearly) full says the disk is full."""
    import errno
    import shutil

    def fail(error):
        def build(opts, work, manifest):
            (work / "vision.onnx").write_bytes(b"half")
            raise error
        return build

    monkeypatch.setattr(bundle_mod, "_build", fail(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(MraError, match="disk filled up"):
        export(vision_only(tmp_path / "b", tiny_ckpt))
    monkeypatch.setattr(bundle_mod, "LOW_DISK_BYTES", shutil.disk_usage(tmp_path).free + (1 << 30))
    monkeypatch.setattr(bundle_mod, "_build", fail(ValueError("Wire format was corrupt")))
    with pytest.raises(MraError, match="disk filled up.*Wire format"):
        export(vision_only(tmp_path / "b", tiny_ckpt))
    assert list(tmp_path.iterdir()) == []  # the partial bundle is gone


def test_recovery_touches_only_its_own_side_paths(finished, tmp_path):
    """An --out named like a glob pattern ("b[1]") must not match another bundle's ".b1.old-"."""
    other = copy_bundle(finished, tmp_path / ".b1.old-zz")
    before = tree(other)
    recover(tmp_path / "b[1]")
    assert tree(other) == before and not (tmp_path / "b[1]").exists()


def test_recovery_removes_a_finished_partial_and_keeps_an_unmarked_one(finished, tmp_path, caplog):
    """A kill after the work folder's mark was removed (the bundle complete, not yet swapped in)
    leaves a finished bundle at the partial path: recovery removes it. A folder that merely looks
    like a partial (no mark, not a bundle) is someone else's and stays."""
    out = tmp_path / "b"
    copy_bundle(finished, tmp_path / ".b.partial-k1ll")
    foreign = tmp_path / ".b.partial-user"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    recover(out)
    assert not (tmp_path / ".b.partial-k1ll").exists() and "removed" in caplog.text
    assert tree(foreign) == {"notes.txt": b"mine"} and not out.exists()
