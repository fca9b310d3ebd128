"""Calibration data, INT8 (QDQ) and FP16 for the vision graph, GGUF quant types."""
