"""Vision-language methods: M3AE; text tokenizers; caption datasets; retrieval."""

from mmmae.vl import extract, sources  # noqa: F401  (register the ``captions`` source, image and text inputs)
from mmmae.vl.models import M3AE, M3AECfg, MultimodalEncoder
from mmmae.vl.retrieval import RetrievalCfg, RetrievalModel  # registers the ``retrieval`` model

__all__ = ["M3AE", "M3AECfg", "MultimodalEncoder", "RetrievalCfg", "RetrievalModel"]
