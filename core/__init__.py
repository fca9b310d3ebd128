"""The bundle format, shared by the exporter and the runtime: the manifest, the names of
graphs, files and prompt parts, the errors, and whole-or-nothing file writing.

Plain Python (no torch, no numpy): ``mra.export`` writes what ``mra.runtime`` reads, and both
import it from here rather than one reaching into the other.
"""
