"""mmmae: masked-autoencoder pretraining for images, videos and image-text pairs on one ViT trunk."""

from mmmae.registry import create_model, list_models, list_sizes

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "list_sizes", "__version__"]
