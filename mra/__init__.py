"""mra-edge: LLaVA-HR (Mixture-of-Resolution Adaptation) on edge devices.

The sub-packages live in the repository's top-level folders (see pyproject's
package-dir): mra.model, mra.export, mra.quantize, mra.runtime, mra.benchmarks.
"""

__version__ = "0.1.0"
