"""One error policy for mra-run, mra-chat and mra-export: user errors one line and exit 1,
bugs one line (traceback with -v), MemoryError with a real message."""

from __future__ import annotations

import pytest

from mra.core.errors import MraError, run_cli


def _raise(e: BaseException):
    def body(argv):
        raise e
    return body


@pytest.mark.parametrize("exc, rc, expected", [
    (MraError("image x | file not found"), 1, "prog: error: image x | file not found\n"),
    (MemoryError(), 1, "prog: error: out of memory; use a smaller model, image size or batch, or close other "
                       "programs\n"),
    (KeyboardInterrupt(), 130, "prog: interrupted\n"),
    (KeyError("boom"), 1, "prog: internal error: KeyError: 'boom' (rerun with -v for the traceback)\n"),
])
def test_one_policy(exc, rc, expected, capsys):
    assert run_cli("prog", _raise(exc), [], verbose=False) == rc
    assert capsys.readouterr().err == expected


def test_verbose_shows_the_traceback_of_a_bug(capsys):
    assert run_cli("prog", _raise(ZeroDivisionError("x")), [], verbose=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("prog: internal error: ZeroDivisionError: x")


@pytest.mark.parametrize("entry", ["mra.runtime.cli:run_main", "mra.runtime.cli:chat_main", "mra.export.cli:main"])
def test_every_cli_uses_it(entry, tmp_path, capsys):
    import importlib

    module, name = entry.split(":")
    main = getattr(importlib.import_module(module), name)
    args = {"run_main": ["--bundle", str(tmp_path), "--image", str(tmp_path / "nope.png"), "--prompt", "q"],
            "chat_main": ["--bundle", str(tmp_path / "nope")],
            "main": ["verify", "--bundle", str(tmp_path / "nope")]}[name]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "nope" in err and "Traceback" not in err
