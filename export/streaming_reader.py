"""A CheckpointReader for reading a whole LLM once, tensor after tensor, in bounded memory.

The reader memory-maps the weight files (safetensors, and .bin with mmap=True), and every
page a tensor is read from stays resident in this process while the map lives: reading a
13.5 GB checkpoint through one reader ends with 13.5 GB of RSS. Opening a fresh reader
after each ``reopen_bytes`` read drops the old maps, so converting or running the
reference over a 7B or 13B checkpoint needs about one tensor plus ``reopen_bytes``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mra.core.errors import MraError

REOPEN_BYTES = 512 << 20


class StreamingReader:
    def __init__(self, ckpt_dir: str | Path, reopen_bytes: int = REOPEN_BYTES):
        self.dir = Path(ckpt_dir)
        self.reopen_bytes = reopen_bytes
        self._reader = self._open()
        self._read = 0

    def _open(self):
        from mra.model.checkpoint import CheckpointError, CheckpointReader

        try:
            return CheckpointReader(self.dir)
        except CheckpointError as e:
            raise MraError(str(e)) from None

    @property
    def config(self) -> dict:
        return self._reader.config

    def keys(self) -> list[str]:
        return self._reader.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._reader

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(key)

    def file_of(self, key: str) -> Path:
        return self._reader.file_of(key)

    def get(self, key: str) -> torch.Tensor:
        """The tensor (it keeps its own file map alive until it is dropped)."""
        from mra.model.checkpoint import CheckpointError

        try:
            t = self._reader.get(key)
        except CheckpointError as e:
            raise MraError(str(e)) from None
        self._read += t.numel() * t.element_size()
        if self._read >= self.reopen_bytes:
            self._reader, self._read = self._open(), 0
        return t
