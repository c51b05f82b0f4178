"""Model families; importing this package registers every built-in model."""
from zoo.models import diffusion, encoder, lm, timm_family, vit  # noqa: F401  (registration side effects)
from zoo.models.base import ModelConfig, ZooModel, load_pretrained

__all__ = ["ModelConfig", "ZooModel", "load_pretrained"]
