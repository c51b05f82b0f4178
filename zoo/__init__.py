"""effzoo: registered efficient LLM, ViT, diffusion and multimodal models with one toolchain."""
from zoo.registry import create_model, list_models, model_info, register_model  # noqa: I001
from zoo import models  # noqa: F401  (registers the built-in families)
from zoo.models.base import ZooModel, load_pretrained
from zoo.patch import patch  # zoo.patch(timm_vit, "tome", r=8): token reduction on a timm ViT
from zoo import viz  # noqa: F401,E402  (zoo.viz.merged_tokens; matplotlib is imported only when drawing)
from zoo import convert  # noqa: F401,E402  (zoo.convert.from_timm)

__version__ = "0.1.0"
__all__ = ["ZooModel", "create_model", "list_models", "load_pretrained", "model_info", "patch", "register_model"]
