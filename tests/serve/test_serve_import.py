import subprocess
import sys


def test_serve_never_imports_torch():
    code = ("import sys, mra.serve, mra.serve.cli, mra.runtime.prompt_cache, mra.runtime.constraint; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
