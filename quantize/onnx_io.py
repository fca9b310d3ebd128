"""Saving and describing ONNX graphs whose weights may live in an external data file.

Protobuf cannot serialise a message over 2 GiB, so a graph whose weights pass
``EXTERNAL_DATA_BYTES`` (the LLaVA-HR-7B tower in FP32 is about 2.3 GB) keeps them in one
``<name>.data`` file beside it. Both files are written in a scratch folder and renamed into
place, data first, so an interrupted save never leaves a graph that points at missing or
half-written weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import ModelProto, TensorProto

# Below protobuf's 2 GiB limit with room for the graph itself and the attributes.
EXTERNAL_DATA_BYTES = 1_800_000_000


def data_file_name(path: str | os.PathLike) -> str:
    return Path(path).name + ".data"


def weight_bytes(model: ModelProto) -> int:
    """Bytes of the initializers' data, whether held in memory or in an external file."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or _typed_bytes(t)
    return total


def _typed_bytes(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def is_large(nbytes: int) -> bool:
    """Whether weights of this size must live in an external data file."""
    return nbytes > EXTERNAL_DATA_BYTES


def needs_external_data(model: ModelProto) -> bool:
    return is_large(weight_bytes(model))


def external_files(path: str | os.PathLike) -> list[str]:
    """Names (relative to the graph's folder) of the external data files a graph uses."""
    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return sorted(names)


def save_onnx(model: ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` (and ``path.data`` when external), whole or not at all.

    external_data None: only when the weights need it."""
    path = Path(path)
    external = needs_external_data(model) if external_data is None else external_data
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        tmp = scratch / path.name
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file_name(path), size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        place_files(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def place_files(src: Path, dst: Path) -> None:
    """Move a saved graph (and its external data, same relative names) from src's folder
    to dst; data first, graph last, so the graph never points at missing weights."""
    if src.name != dst.name:
        raise ValueError(f"place_files | {src.name} != {dst.name}: external data locations are relative names")
    names = external_files(src)
    for name in names:
        shutil.copymode(src, src.parent / name)  # onnx writes data files 0600; a bundle is read by others
        os.replace(src.parent / name, dst.parent / name)
    os.replace(src, dst)
    stale = dst.with_name(data_file_name(dst))
    if stale.exists() and stale.name not in names:
        stale.unlink()  # left by an earlier, larger save of the same graph
