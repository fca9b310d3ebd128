"""The shared weight file of a bundle of several input sizes, mapped once into memory.

Every size's onnxruntime session gets its large initializers as OrtValues over this one
mapping (``SessionOptions.add_initializer``: used in place, never copied), so three sizes
cost the weights once. Prepacking is then off in those sessions: it would give each session
its own repacked copy of every matrix (measured: 3 sessions of 128 MB of weights, 617 MB RSS
with prepacking, 361 MB without)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mra.core.errors import BadBundle

DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")


class MappedWeights:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise BadBundle(f"{self.path} | cannot map the shared vision weights: {e}; re-export the bundle") from None

    def initializers(self, table: dict, graph: str) -> dict:
        """OrtValues over the mapping for a graph's table ``{name: [offset, length, dtype, dims]}``
        (its manifest entry's ``info["initializers"]``), each checked against the file."""
        import onnxruntime as ort

        out = {}
        for name, entry in table.items():
            try:
                offset, length, dtype, dims = entry
                dims = tuple(int(d) for d in dims)
                ok = (dtype in DTYPES and 0 <= offset and offset + length <= self.raw.size
                      and length == int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
                      and offset % np.dtype(dtype).itemsize == 0)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise BadBundle(f"{graph} initializer {name} | got {entry!r}, expected [offset, length, dtype, dims] "
                                f"inside {self.path.name} ({self.raw.size} bytes); re-export the bundle")
            arr = self.raw[offset:offset + length].view(dtype).reshape(dims)
            out[name] = ort.OrtValue.ortvalue_from_numpy(arr)  # keeps ``arr`` (and the mapping) alive
        return out
