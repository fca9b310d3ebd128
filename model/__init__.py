"""The LLaVA-HR vision side in torch, built from a released checkpoint."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, CheckpointReader, read_config
from .config import ConfigError, VisionConfig, check_image_size, num_image_tokens, vision_config
from .tower import MRAVisionTower


def read_vision_config(checkpoint_dir: str | Path) -> VisionConfig:
    """The tower architecture of a checkpoint; errors name the checkpoint's config.json."""
    return vision_config(read_config(checkpoint_dir), str(Path(checkpoint_dir) / "config.json"))


def load_vision(checkpoint_dir: str | Path, image_size: int | None = None) -> MRAVisionTower:
    """The vision tower + MR-Adapters + projector of a checkpoint, in eval mode, float32.

    forward(pixel_values [B, 3, S, S]) -> image embeddings [B, N, D_llm], N = max(S/32, 24)^2.
    """
    reader = CheckpointReader(checkpoint_dir)
    tower = MRAVisionTower(read_vision_config(checkpoint_dir), image_size)
    return tower.load_from(reader).eval()


__all__ = [
    "load_vision", "MRAVisionTower", "CheckpointReader", "CheckpointError", "ConfigError",
    "VisionConfig", "vision_config", "read_vision_config", "read_config", "check_image_size", "num_image_tokens",
]
