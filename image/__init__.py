"""Image methods: MAE and SimMIM; image datasets."""

from mmmae.image import datasets  # noqa: F401  (registers the image sources)
from mmmae.image.mae import MAE, MAECfg
from mmmae.image.simmim import SimMIM, SimMIMCfg

__all__ = ["MAE", "MAECfg", "SimMIM", "SimMIMCfg"]
