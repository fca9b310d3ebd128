"""One weight file for the vision graphs of several input sizes.

The graphs of one checkpoint at 384, 768 and 1024 hold the same weights (only the ViT's
resampled position embeddings and the INT8 activation scales differ), so a bundle of several
sizes stores each distinct tensor once, in ``VISION_WEIGHTS``, and every graph points at it by
offset. The runtime maps that file once and hands the same buffers to the session of every
size (``runtime/mapped_weights.py``). Offsets are 64-byte aligned: every dtype's alignment and a
cache line, without the page padding that would double a small model's file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ALIGN = 64
MIN_BYTES = 1024  # smaller tensors stay inside their graph (scales, shapes, biases of tiny layers)
# The tensors the runtime hands to every size's session (``initializers`` of the manifest entry):
# weights read only as input 1 of these ops. onnxruntime's layout optimizers rewrite other
# constants in place (a [1, C, 1, 1] layer scale becomes channels-last), which a tensor given
# with SessionOptions.add_initializer cannot follow; measured, these hold 99.7 % of the bytes.
SHARED_CONSUMERS = ("MatMul", "Gemm", "Conv")
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


class SharedWeights:
    """Appends the initializers of graphs to one file, each distinct content once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._offsets: dict[bytes, int] = {}
        self.stored = 0  # bytes of tensor data written
        self.referenced = 0  # bytes the graphs point at (more than stored: shared tensors count once per graph)

    def add_graph(self, src: Path, dst: Path) -> dict[str, list]:
        """Write the graph at ``src`` (weights inline or beside it) to ``dst`` in ``self.path``'s
        folder, its large initializers moved into the shared file. Returns where each one lies,
        ``{name: [offset, length, dtype, dims]}`` of the weights the sessions share
        (``SHARED_CONSUMERS``): the manifest records it, so that the runtime (which has no
        ``onnx`` package) maps the tensors without parsing the graph."""
        import onnx
        from onnx import TensorProto, numpy_helper

        if Path(dst).parent != self.path.parent:
            raise ValueError(f"add_graph | {dst} must be beside {self.path}: locations are relative names")
        model = onnx.load(str(src))  # with its external data, if any
        uses: dict[str, list[tuple[str, int]]] = {}
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                uses.setdefault(name, []).append((node.op_type, i))
        table = {}
        for t in model.graph.initializer:
            arr = numpy_helper.to_array(t)
            if arr.nbytes < MIN_BYTES:
                continue
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()  # ONNX stores little-endian
            offset = self._offset(data)
            for f in _DATA_FIELDS:
                t.ClearField(f)
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            self.referenced += len(data)
            if t.name in uses and all(op in SHARED_CONSUMERS and i == 1 for op, i in uses[t.name]):
                table[t.name] = [offset, len(data), arr.dtype.name, list(arr.shape)]
        tmp = Path(dst).with_name(f".{Path(dst).name}.partial")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, dst)
        return table

    def _offset(self, data: bytes) -> int:
        key = hashlib.sha256(data).digest()
        if key not in self._offsets:
            self._file.write(b"\0" * (-self._file.tell() % ALIGN))
            self._offsets[key] = self._file.tell()
            self._file.write(data)
            self.stored += len(data)
        return self._offsets[key]

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
