"""What the manifest records about the source checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mra.core.manifest import Manifest
from mra.model import check_image_size, num_image_tokens, read_config, read_vision_config


def describe_source(ckpt: Path, image_size: int | None) -> Manifest:
    cfg = read_config(ckpt)
    vc = read_vision_config(ckpt)
    s = vc.image_size if image_size is None else image_size  # 0 is an error, not the default
    check_image_size(vc.vit, s)
    source = {
        "path": str(Path(ckpt).resolve()),
        "name": Path(ckpt).resolve().name,
        "config_sha256": hashlib.sha256((Path(ckpt) / "config.json").read_bytes()).hexdigest(),
        "vision_tower": cfg.get("mm_vision_tower"),
        "vision_tower_slow": cfg.get("vision_tower_slow"),
    }
    return Manifest.new(source, s, num_image_tokens(vc.vit, s), vc.llm_hidden_size)
