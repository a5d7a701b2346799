import pytest
import torch

from mimia.models import ModelSpec

torch.set_num_threads(1)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    """A MAE small enough for unit tests: 16x16 images, 4x4 patches."""
    return ModelSpec(
        recipe="mae",
        encoder="vit_tiny_patch16_224",
        encoder_overrides={"embed_dim": 32, "depth": 2, "num_heads": 2},
        img_size=16,
        patch_size=4,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
