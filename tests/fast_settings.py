"""The tiny bundle's Pipeline settings every test folder runs with (a module test files
import; they never import conftest): a context long enough for one image (576 rows at
S=384) and a long answer, one thread so that test folders on parallel workers do not
compete for cores."""

FAST_PIPELINE = {"n_ctx": 2048, "n_threads": 1}
FAST_ARGS = ["--n-ctx", str(FAST_PIPELINE["n_ctx"]), "--threads", str(FAST_PIPELINE["n_threads"])]
