"""Video methods (VideoMAE, OmniMAE, BEVT-style) and video data: decoding, clip sampling, transforms,
datasets and the ``data.dataset`` sources they register."""

from mmmae.video import extract, sources  # noqa: F401  (register the video data sources and video inputs)
from mmmae.video import moving_mnist  # noqa: F401  (registers moving_fashion_mnist)
from mmmae.video.models import (BEVT, BEVTCfg, BEVTSpatial, BEVTSpatialCfg, OmniMAE, OmniMAECfg, VideoMAE,
                                VideoMAECfg)

__all__ = ["BEVT", "BEVTCfg", "BEVTSpatial", "BEVTSpatialCfg", "OmniMAE", "OmniMAECfg", "VideoMAE", "VideoMAECfg"]
