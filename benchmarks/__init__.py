"""mra-bench: one suite of sections (suite.py) that measure and write results.json, REPORT.md
and plots. Sections share the bench model (bench_model.py), the isolated-process runner
(isolated.py), the timing helper (timing.py) and the report writer (report.py). The GPU
check (gpu_check.sh, gpu_latency.py) runs on its own on a GPU machine."""
