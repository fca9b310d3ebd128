"""mra-edge: LLaVA-HR (Mixture-of-Resolution Adaptation) on edge devices.

The sub-packages live in the repository's top-level folders (see pyproject's
package-dir): mra.core (the bundle format, names, errors; plain Python), mra.model (the
torch model), mra.export (checkpoint -> bundle), mra.quantize (INT8, FP16, GGUF types),
mra.runtime (the torch-free Pipeline and mra-run / mra-chat), mra.serve (mra-serve) and
mra.benchmarks (mra-bench and the GPU check); mra.llama_shape lives here.
"""

__version__ = "0.1.0"
