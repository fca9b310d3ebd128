"""Scripts that measure and write results (JSON + markdown + plots); mra-bench."""
