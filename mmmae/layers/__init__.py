"""Building blocks shared by every mmmae model."""

from mmmae.layers.attention import (Attention, RelativePositionBias, gather_relative_position_bias,
                                    key_padding_bias, relative_position_index)
from mmmae.layers.block import Block, DropPath, LayerScale, Mlp, drop_path
from mmmae.layers.patch_embed import PatchEmbed2d, TubeletEmbed3d
from mmmae.layers.patchify import patchify, patchify_video, unpatchify, unpatchify_video
from mmmae.layers.pos_embed import (sincos_1d, sincos_pos_embed_1d, sincos_pos_embed_2d,
                                    sincos_pos_embed_3d)

__all__ = [
    "Attention", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed2d", "RelativePositionBias",
    "TubeletEmbed3d", "drop_path", "gather_relative_position_bias", "key_padding_bias", "patchify",
    "patchify_video", "relative_position_index", "sincos_1d", "sincos_pos_embed_1d",
    "sincos_pos_embed_2d", "sincos_pos_embed_3d", "unpatchify", "unpatchify_video",
]
