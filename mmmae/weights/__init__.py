"""The one weights layer: every released checkpoint layout into mmmae models, mmmae out to Hugging
Face, timm and the official repositories' layouts.

``load(model, source, layout="auto", part="all", strict=True) -> LoadReport`` is the only code that
reads state dicts into models (init_from, evaluation tools, extraction, BEVT's inflation and
retrieval's initialisation all go through it); ``export`` writes the other way.
"""

from mmmae.weights.export import FORMATS, HF_CLASSES, ExportError, export
from mmmae.weights.io import Source, read_source
from mmmae.weights.layouts import LAYOUTS, Converted, PosTable, convert, detect_layout
from mmmae.weights.loader import PARTS, LoadReport, WeightsError, load

__all__ = ["FORMATS", "HF_CLASSES", "LAYOUTS", "PARTS", "Converted", "ExportError", "LoadReport", "PosTable",
           "Source", "WeightsError", "convert", "detect_layout", "export", "load", "read_source"]
