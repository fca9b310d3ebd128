import subprocess
import sys


def test_core_is_plain_python():
    """The bundle format loads where only the runtime's smallest install is: no torch, not even numpy."""
    code = ("import sys, mra.core.errors, mra.core.files, mra.core.manifest, mra.core.names; "
            "bad = [m for m in ('torch', 'numpy', 'onnx', 'onnxruntime') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_and_export_share_the_format_without_reaching_into_each_other():
    """mra.export imports the format from mra.core; mra.runtime keeps no copy of it."""
    code = ("import mra.runtime, mra.core.manifest as m, mra.export.bundle as b; "
            "assert b.Manifest is m.Manifest; "
            "import importlib.util as u; "
            "gone = [n for n in ('errors', 'files', 'manifest', 'names') if u.find_spec(f'mra.runtime.{n}')]; "
            "assert not gone, gone")
    subprocess.run([sys.executable, "-c", code], check=True)
