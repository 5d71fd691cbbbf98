"""Reconstructions of a pretraining checkpoint on any image or video.

python tools/visualize.py --config CFG --checkpoint CKPT --input PATH --out FILE \
    [--seed S] [--mask-ratio R] [--fps F] [key=value ...]

An image gives a PNG (or JPEG) row: original | masked | reconstruction | reconstruction with the
visible patches pasted back (the four panels of MAE's demo/mae_visualize.ipynb). A video gives a GIF
or MP4 with the same four panels side by side in every frame of the clip the model sees (its
``num_frames`` frames every ``data.sampling_rate``, the centre clip, short side resized and centre-cropped
to ``img_size``, as tools/extract.py reads videos).

Per-patch normalised predictions (``norm_pix_loss``) are mapped back to pixels with the original
patch's statistics (images per patch as MAE's target, videos per channel and tubelet as VideoMAE's
run_videomae_vis.py; see mmmae.visualize). The mask is the method's own (the data pipeline's mask
maker) drawn from ``torch.Generator().manual_seed(S)`` (default 0), at the config's ratio or at
``--mask-ratio R`` (the method's ``mask_ratio``, or ``image_mask_ratio`` / ``video_mask_ratio`` for
methods with one per modality). Decoder masking (VideoMAEv2) is left out: every hidden token is drawn.

Images work with image methods (mae, simmim, bevt_spatial, m3ae) and the methods that take images as
one-tubelet clips (omnimae, bevt); videos with video methods (videomae, omnimae, bevt). A checkpoint
that does not fit the config's model, an unreadable input, or a method without pixel predictions
(classifiers, HOG targets) is a clear error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

IMAGE_OUTPUTS = (".png", ".jpg", ".jpeg")
VIDEO_OUTPUTS = (".gif", ".mp4")

log = logging.getLogger("mmmae.visualize")


def input_kind(path: str) -> str:
    """``image`` or ``video`` by the file's extension; a missing file or another extension is an error."""
    from mmmae.video.datasets import VIDEO_EXTENSIONS
    from mmmae.vl.data import IMAGE_EXTS

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    ext = os.path.splitext(path.lower())[1]
    if ext[1:] in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    raise ValueError(f"--input {path}: not an image ({', '.join(IMAGE_EXTS)}) nor a video "
                     f"({', '.join(VIDEO_EXTENSIONS)}) by its extension")


def input_stats(cfg: Any) -> tuple[Sequence[float], Sequence[float]]:
    """The mean/std images were normalised with in training: the caption data's statistics for
    caption sources (M3AE: CC12M's by default), ImageNet's for every other image source."""
    from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD
    if cfg.data.dataset == "captions":
        from mmmae.vl.data import image_stats
        from mmmae.vl.sources import caption_image_norm
        return image_stats(caption_image_norm(cfg))
    return IMAGENET_MEAN, IMAGENET_STD


def check_modality(name: str, mcfg: Any, kind: str) -> None:
    """The input must be of a kind the method reads (its spec's input keys): image methods draw images,
    video methods videos, and images too where they take an image as a one-tubelet clip (omnimae, bevt)."""
    from mmmae.registry import get_spec
    keys = get_spec(name).input_keys(mcfg)
    if kind not in keys:
        other = "an image" if kind == "video" else "a video"
        raise ValueError(f"method {name!r} reconstructs {' and '.join(k + 's' for k in keys if k != 'text')}; "
                         f"--input must be {other}, got {'a video' if kind == 'video' else 'an image'}")


def read_image(path: str, img_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(1, 3, S, S): short side resized to S (bicubic), centre crop, normalised."""
    from mmmae.data.transforms import eval_transform
    from mmmae.vl.data import _BAD_IMAGE_ERRORS, _load_rgb

    try:
        pil = _load_rgb(path)
    except _BAD_IMAGE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return eval_transform(img_size, crop_pct=1.0, mean=mean, std=std)(pil)[None]


def read_clip(path: str, cfg: Any, mcfg: Any) -> torch.Tensor:
    """(1, 3, T, S, S): the centre clip of the model's ``num_frames`` every ``data.sampling_rate``."""
    from mmmae.data.registry import input_data
    from mmmae.video.datasets import VideoTestDataset

    d = input_data(cfg, "video")
    ds = VideoTestDataset([(path, -1)], num_frames=int(mcfg.num_frames), sampling_rate=d.sampling_rate,
                          num_clips=1, num_crops=1, crop_size=mcfg.img_size, backend=d.backend,
                          short_clip=d.short_clip)
    sample = ds[0]
    if not sample["valid"]:
        raise ValueError(f"cannot read video {path}: {sample['error']}")
    return sample["video"][:1]


def make_batch(name: str, mcfg: Any, kind: str, x: torch.Tensor, seed: int, mask_ratio: float | None
               ) -> dict[str, torch.Tensor]:
    """The input with the method's own mask for it, from ``manual_seed(seed)`` (at ``mask_ratio``
    when given); decoder masks are dropped so every hidden token is reconstructed."""
    from mmmae.registry import get_spec

    if mask_ratio is not None:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
        fields = {f.name for f in dataclasses.fields(mcfg)}
        key = f"{kind}_mask_ratio" if f"{kind}_mask_ratio" in fields else "mask_ratio"
        if key not in fields:
            raise ValueError(f"method {name!r} has no mask ratio to set (no {kind}_mask_ratio or mask_ratio field)")
        mcfg = dataclasses.replace(mcfg, **{key: mask_ratio})
    masks = get_spec(name).make_mask_fn(mcfg)(1, torch.Generator().manual_seed(seed), modality=kind)  # type: ignore[misc]
    if kind == "image" and "image_mask" in masks:  # BEVT's image stream
        return {"image": x, "image_mask": masks["image_mask"]}
    return {kind: x, "mask": masks["mask"]}


def frames_of(views: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Video views (1, 3, T, H, W) -> T pictures (3, H, 4*W), the four panels side by side."""
    from mmmae.visualize import VIEWS
    return [torch.cat([views[k][0, :, t] for k in VIEWS], dim=-1) for t in range(views["original"].shape[2])]


def save_animation(frames: Sequence[torch.Tensor], path: Path, fps: float) -> None:
    """(3, H, W) pictures in [0, 1] -> an animated GIF (PIL) or an MP4 (PyAV: H.264, else MPEG-4)."""
    from PIL import Image

    from mmmae.engine.visualize import to_uint8

    arrays = [to_uint8(f).numpy() for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(a) for a in arrays]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return
    import av
    import numpy as np

    h, w = arrays[0].shape[:2]
    even = [np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for a in arrays]  # yuv420p needs even sides
    with av.open(str(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=round(fps))
        except (av.error.FFmpegError, ValueError):
            stream = container.add_stream("mpeg4", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for a in even:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        container.mux(stream.encode(None))


@torch.no_grad()
def visualize(cfg: Any, checkpoint: str, input_path: str, out_path: str, *, seed: int = 0,
              mask_ratio: float | None = None, fps: float = 4.0, device: torch.device | None = None
              ) -> dict[str, Any]:
    """Draw the checkpoint's reconstruction of ``input_path`` into ``out_path``; returns a summary."""
    from mmmae.config import model_cfg
    from mmmae.engine.visualize import reconstruction_views, save_png, views_row
    from mmmae.registry import get_spec
    from mmmae.embedding import load_model

    name, mcfg = cfg.model.name, model_cfg(cfg.model)
    kind = input_kind(input_path)
    out = Path(out_path)
    allowed = IMAGE_OUTPUTS if kind == "image" else VIDEO_OUTPUTS
    if out.suffix.lower() not in allowed:
        raise ValueError(f"--out {out_path}: a {kind} is drawn as {' or '.join(allowed)}, not {out.suffix or 'no suffix'}")
    spec = get_spec(name)
    if spec.visualize is None or spec.make_mask_fn is None:
        raise ValueError(f"method {name!r} is not a masked pretraining method: it has no reconstruction to draw")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(cfg, checkpoint, device, strict=True)
    check_modality(name, mcfg, kind)
    mean, std = input_stats(cfg)
    x = read_image(input_path, mcfg.img_size, mean, std) if kind == "image" else read_clip(input_path, cfg, mcfg)
    batch = make_batch(name, mcfg, kind, x, seed, mask_ratio)
    outputs = model({k: v.to(device) for k, v in batch.items()})
    views = reconstruction_views(spec, model, batch, {k: v.cpu() for k, v in outputs.items()}, mean=mean, std=std)
    if views is None:
        raise ValueError(f"method {name!r} does not predict pixels with this config (e.g. a HOG target): "
                         f"there is no reconstruction to draw")
    if kind == "image":
        save_png(views_row(views, 0), out)
    else:
        save_animation(frames_of(views), out, fps)
    mask = batch.get("mask", batch.get("image_mask"))
    assert mask is not None
    return {"output": str(out), "method": name, "checkpoint": checkpoint, "input": input_path, "kind": kind,
            "seed": seed, "hidden": int(mask.sum()), "tokens": int(mask.shape[1]),
            "frames": int(x.shape[2]) if kind == "video" else 1, "loss": float(outputs["loss"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the pretraining config (a path or a packaged name)")
    p.add_argument("--checkpoint", required=True, help="model.safetensors (or a checkpoint file) of a run")
    p.add_argument("--input", required=True, help="an image or a video file")
    p.add_argument("--out", required=True, help="FILE.png for an image; FILE.gif or FILE.mp4 for a video")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask (default 0)")
    p.add_argument("--mask-ratio", type=float, default=None, help="mask ratio (default: the config's)")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second of a video's picture (default 4)")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    try:
        summary = visualize(cfg, args.checkpoint, args.input, args.out, seed=args.seed, mask_ratio=args.mask_ratio,
                            fps=args.fps)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("%s: %d of %d tokens hidden (seed %d), loss %.4f -> %s", summary["input"], summary["hidden"],
             summary["tokens"], summary["seed"], summary["loss"], summary["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
