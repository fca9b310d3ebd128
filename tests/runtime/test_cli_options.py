"""Every command that opens a Pipeline (the CLIs, the benchmarks, the example apps) lists the
same options, from the one declaration in runtime/cli_options.py: its --help's "runtime"
section is that declaration's, word for word, and the parsed options open the Pipeline with
the same keywords."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
from pathlib import Path

import pytest

from mra.runtime.cli_options import add_pipeline_args, pipeline_kwargs


def _section(help_text: str, title: str) -> str:
    """The lines of one argument group in a --help text (the title line to the next blank line)."""
    lines = help_text.splitlines()
    start = lines.index(f"{title}:")
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _reference(n_ctx: int | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reference")
    add_pipeline_args(p, n_ctx=n_ctx)
    return p


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _commands():
    from mra.benchmarks import ray_serve, serve_bench
    from mra.runtime.cli import chat_main, run_main
    from mra.serve.cli import main as serve_main

    return {"mra-run": (run_main, None), "mra-chat": (chat_main, None), "mra-serve": (serve_main, None),
            "serve_bench": (serve_bench.main, serve_bench.N_CTX), "ray_serve": (ray_serve.main, ray_serve.N_CTX),
            **{name: (_example(name), None) for name in EXAMPLE_APPS}}


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_APPS = ("caption_folder", "yes_no_scoring", "camera_qa")


@pytest.mark.parametrize("name", ["mra-run", "mra-chat", "mra-serve", "serve_bench", "ray_serve", *EXAMPLE_APPS])
def test_help_lists_the_declared_pipeline_options(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # one width for both texts
    main, n_ctx = _commands()[name]
    shown = _section(_help(main, capsys), "runtime")
    declared = _section(_reference(n_ctx).format_help(), "runtime")
    assert shown == declared
    for option in ("--prompt-cache-gb", "--exif-transpose", "--n-ctx", "--vision", "--no-hash"):
        assert option in shown


def test_kwargs_are_from_bundle_keywords():
    from mra.runtime.pipeline import Pipeline

    a = _reference().parse_args(["--bundle", "b", "--n-ctx", "512", "--threads", "3", "--no-hash",
                                 "--exif-transpose", "--prompt-cache", "pc", "--prompt-cache-gb", "0.5"])
    kw = pipeline_kwargs(a)
    assert set(kw) <= set(inspect.signature(Pipeline.from_bundle).parameters)
    assert kw["n_ctx"] == 512 and kw["n_threads"] == 3 and kw["verify_hash"] is False
    assert kw["exif_transpose"] is True and str(kw["prompt_cache"]) == "pc"
    assert kw["prompt_cache_bytes"] == 1 << 29


@pytest.mark.parametrize("args, message", [
    (["--n-ctx", "0"], "--n-ctx | got 0, expected > 0"),
    (["--threads", "x"], "--threads | got 'x', expected a number"),
    (["--prompt-cache-gb", "nan"], "--prompt-cache-gb | got nan, expected > 0"),
    (["--prompt-cache-gb", "inf"], "--prompt-cache-gb | got inf, expected > 0"),
])
def test_numbers_are_checked_while_parsing(args, message, capsys):
    with pytest.raises(SystemExit):
        _reference().parse_args(["--bundle", "b", *args])
    assert message in capsys.readouterr().err
