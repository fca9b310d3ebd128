"""mra-export's arguments: the defaults are ExportOptions' (and through it Int8Options'), and
the subcommands are one table that --help lists and main() dispatches."""

from __future__ import annotations

import argparse

from mra.export import cli
from mra.export.options import ExportOptions
from mra.quantize.int8_options import Int8Options


def test_an_export_without_options_gets_the_dataclass_defaults(tmp_path):
    opts = cli.options_from(cli.export_parser().parse_args(["--model", str(tmp_path), "--out", str(tmp_path / "b")]))
    assert opts == ExportOptions(out=tmp_path / "b", model=tmp_path)
    assert opts.int8_options() == Int8Options()
    trt = cli.options_from(cli.export_parser().parse_args(["--bundle", str(tmp_path), "--target", "trt"]))
    assert trt.precisions == list(cli.TRT_PRECISIONS)


def test_help_shows_the_dataclass_defaults():
    text = " ".join(cli.export_parser().format_help().split())
    i8 = Int8Options()
    for shown in (f"(default {i8.method};", f"(default {i8.smooth_alpha}):", f"(default {i8.max_float_fraction})",
                  f"(default {ExportOptions.calib_count})", "(default 1,1,4)", "(default Q4_K_M)",
                  "(default: fp32 for onnx, fp16 for trt)"):
        assert shown in text, shown


def test_a_registered_subcommand_is_listed_and_dispatched(monkeypatch, capsys):
    def parser(prog: str) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=prog)
        p.add_argument("--code", type=int, default=0)
        return p

    def run(a: argparse.Namespace) -> int:
        print(f"ran with {a.code}")
        return a.code

    monkeypatch.setitem(cli.SUBCOMMANDS, "echo", cli.Subcommand(parser, run))
    assert "Subcommands: make-tiny, plan-memory, verify, inspect, echo " in " ".join(
        cli.export_parser().format_help().split())
    assert cli.main(["echo", "--code", "3"]) == 3
    assert capsys.readouterr().out == "ran with 3\n"
    assert cli.main(["echo"]) == 0
    for name, command in cli.SUBCOMMANDS.items():
        assert command.parser(f"mra-export {name}").format_usage().startswith(f"usage: mra-export {name} ")
