"""`mra-serve --ray` option errors: one line, exit 1, before any Ray process starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ray.serve")


@pytest.mark.parametrize("args,message", [
    (["--autoscale", "3,1"], "ray options | replicas 3..1"),
    (["--autoscale", "two,four"], "--autoscale | got 'two,four', expected MIN,MAX"),
    (["--replicas", "0"], "ray options | replicas 0..0"),
    (["--max-batch", "0"], "max batch 0"),
])
def test_bad_ray_options_are_one_line(tiny_bundle, args, message):
    r = subprocess.run([sys.executable, "-m", "mra.serve.cli", "--bundle", str(tiny_bundle), "--ray", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mra-serve: error: ") and message in lines[0], r.stderr


def test_import_mra_serve_does_not_import_ray():
    code = "import sys, mra.serve, mra.serve.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
