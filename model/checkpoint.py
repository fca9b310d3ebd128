"""Lazy, checked reader of a LLaVA-HR checkpoint directory as released.

Layouts: ``model.safetensors``; sharded ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``; ``pytorch_model*.bin`` (optionally with
``pytorch_model.bin.index.json``), read with ``torch.load(weights_only=True, mmap=True)``.
Tensors are read one key at a time, so exporting the vision tower of a 13B checkpoint
never loads the LLM.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from mra.core.errors import MraError
from mra.core.files import read_json


class CheckpointError(MraError):
    """A checkpoint file or key is missing, mis-shaped or unreadable; the message names it."""


def read_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} | not a directory")
    if not path.is_file():
        raise CheckpointError(f"{path} | missing: a LLaVA-HR checkpoint directory has a config.json")
    cfg = read_json(path, CheckpointError)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} | top level is a JSON {type(cfg).__name__}, expected an object")
    return cfg


class CheckpointReader:
    """Maps every tensor name to the file that holds it; reads tensors on demand."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.config = read_config(self.dir)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        st = sorted(self.dir.glob("*.safetensors"))
        bins = sorted(self.dir.glob("pytorch_model*.bin"))
        if st:
            self._check_index("model.safetensors.index.json")
            self._index(st, self._safetensors_keys)
        elif bins:
            self._check_index("pytorch_model.bin.index.json")
            self._index(bins, self._bin_keys)
        else:
            raise CheckpointError(
                f"checkpoint {self.dir} | no *.safetensors or pytorch_model*.bin weights found")

    # --- indexing -----------------------------------------------------------
    def _check_index(self, name: str) -> None:
        """A shard the HF index lists but the directory lacks is an incomplete download: say so,
        rather than report the first missing key."""
        path = self.dir / name
        if not path.is_file():
            return
        try:
            files = set(json.loads(path.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path} | not a valid weight index ({_first_line(e)})") from None
        missing = sorted(f for f in files if not (self.dir / f).is_file())
        if missing:
            raise CheckpointError(f"{path} | lists {len(missing)} shard(s) missing from the directory: "
                                  f"{', '.join(missing)}; incomplete download?")

    def _index(self, files: list[Path], keys_of) -> None:
        for f in files:
            for k in keys_of(f):
                self._where[k] = f

    def _safetensors_keys(self, f: Path):
        from safetensors import safe_open

        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise CheckpointError(
                f"{f} | unreadable safetensors file ({_first_line(e)}); truncated download?") from None
        self._open[f] = h
        size = f.stat().st_size
        # safetensors checks offsets lazily: a truncated file must fail here, not mid-export.
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise CheckpointError(f"{f} | truncated: {size} bytes, the header needs {8 + header_len + end}")
        return list(h.keys())

    def _bin_keys(self, f: Path):
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{f} | refused by torch.load(weights_only=True): {_refusal_reason(e)}; the pickle holds more than "
                "tensors, so it was not loaded: use a safetensors checkpoint from a trusted source") from None
        except Exception as e:
            raise CheckpointError(
                f"{f} | unreadable: {_first_line(e)} (truncated or not a torch checkpoint?)") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f} | expected a state dict, got {type(sd).__name__}")
        self._open[f] = sd
        return list(sd.keys())

    # --- access ---------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"checkpoint {self.dir} | missing key {key}")
        f = self._where[key]
        h = self._open[f]
        try:
            t = h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]
        except Exception as e:
            raise CheckpointError(f"{f} | cannot read key {key}: {_first_line(e)}") from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{f} | key {key} holds a {type(t).__name__}, expected a tensor")
        return t

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._where:
            raise CheckpointError(f"checkpoint {self.dir} | missing key {key}")
        h = self._open[self._where[key]]
        if hasattr(h, "get_slice"):
            return tuple(h.get_slice(key).get_shape())
        return tuple(h[key].shape)

    def get_checked(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.get(key)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self._where[key]} | key {key} has shape {list(t.shape)}, expected {list(shape)}")
        return t


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _refusal_reason(e: BaseException) -> str:
    """The line of torch's weights_only message that names what was refused (its first line is
    generic advice to retry with weights_only=False, which we never do)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "unsupported" in ln.lower()]
    other = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (named or other or lines or [type(e).__name__])[0]
