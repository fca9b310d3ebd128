import subprocess
import sys


def test_runtime_never_imports_torch():
    code = "import sys, mra.runtime; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
