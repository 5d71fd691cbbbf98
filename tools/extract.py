"""Extract embeddings of videos, images or captions with a trained model.

python tools/extract.py --config CFG --checkpoint CKPT --modality video|image|text --input PATH \
    --out PREFIX [--normalize] [key=value ...]

Writes PREFIX.npy (float32, one row per input that could be read), PREFIX.ids.txt (the row ids, one a
line) and PREFIX.report.json (counts, what a row is, skipped inputs with reasons).

--input: videos: a folder (searched recursively; ids = paths relative to it) or a list file of
``path [label]`` lines (paths relative to --root, default data.root or the current directory; ids =
the paths as written). Images: a folder, or a list file with one path per line. Texts: a text file
with one caption per line (ids = line numbers, from 1) or a COCO captions json (ids = annotation ids).

What a row is: a ``retrieval`` model gives its joint-space embeddings (a video = the mean of its
centre-clip frames' image embeddings), so videos, images and captions compare by cosine similarity;
``m3ae`` gives pooled encoder features; video and image pretraining / classifier models give
mean-pooled encoder features (no text). See mmmae.embedding for the full table.

--layer K: block K's output (0-based, negative from the end; no final norm) mean-pooled over the patch
tokens, from the encoder's forward_intermediates, instead of the model's embedding (images, videos).

--windows LEN:STRIDE (videos): one row per sliding window over each whole video, as VideoMAEv2's
extract_tad_feature.py for temporal action detection: windows of LEN consecutive frames starting every
STRIDE frames while a whole window fits (16:4 is its THUMOS14 setting, 16:16 FineAction), each frame
resized to the model's img_size square; ids are ``video#start_frame``. --window-norm: the frames'
normalisation, none (the reference's: [0, 1]), imagenet or cc12m. A window longer than a video is an error.

--index: also write PREFIX.faiss and PREFIX.index.json (exact IndexFlatIP under --ivf-min-rows rows,
default 10000, else IndexIVFFlat with nlist = sqrt(N)), recording the config, overrides, checkpoint and
modality for tools/search.py. An index larger than the available memory (rows * dim * 4 bytes) is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training config (a path or a packaged name)")
    p.add_argument("--checkpoint", required=True,
                   help="a run's model.safetensors or folder, a DeepSpeed checkpoint folder, or an official / timm / Hugging Face checkpoint (any layout mmmae.weights reads)")
    p.add_argument("--modality", required=True, choices=("video", "image", "text"))
    p.add_argument("--input", required=True, help="a folder, a list file, a caption text file or a COCO json")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.npy, PREFIX.ids.txt, PREFIX.report.json")
    p.add_argument("--normalize", action="store_true", help="L2-normalise every row")
    p.add_argument("--root", default=None, help="prefix for relative paths in list files (default data.root)")
    p.add_argument("--batch-size", type=int, default=0, help="inputs per forward (default data.batch_size)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--layer", type=int, default=None, help="block K's mean-pooled output instead of the embedding")
    p.add_argument("--windows", default="", metavar="LEN:STRIDE", help="videos: one row per sliding window")
    p.add_argument("--window-norm", default="none", choices=("none", "imagenet", "cc12m"),
                   help="--windows frame normalisation (default none, as VideoMAEv2's extract_tad_feature.py)")
    p.add_argument("--index", action="store_true", help="also write a faiss index (PREFIX.faiss, PREFIX.index.json)")
    p.add_argument("--ivf-min-rows", type=int, default=10_000, help="rows from which the index is IVF, not exact")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    try:
        report = _extract(cfg, args)
        if args.index:
            from mmmae.index import build_index
            meta = build_index(args.out, _source(args, overrides, report), ivf_min_rows=args.ivf_min_rows)
    except (ValueError, FileNotFoundError, KeyError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger("mmmae.extract")
    log.info("%d of %d %ss embedded (%d skipped), %d rows of dim %d: %s -> %s.npy", report["num_embedded"],
             report["num_inputs"], args.modality, report["num_skipped"], report["num_rows"], report["dim"],
             report["embedding"], args.out)
    if args.index:
        log.info("index: %s over %d rows -> %s.faiss", meta["kind"], meta["rows"], args.out)
    return 0


def _extract(cfg: "DictConfig", args: argparse.Namespace) -> dict:
    from mmmae.embedding import extract
    from mmmae.video.extract import extract_windows, parse_windows
    common = {"normalize": args.normalize, "root": args.root, "batch_size": args.batch_size or None,
              "progress": not args.no_progress, "layer": args.layer}
    if not args.windows:
        return extract(cfg, args.checkpoint, args.modality, args.input, args.out, **common)
    if args.modality != "video":
        raise ValueError(f"--windows slides over videos; got --modality {args.modality}")
    length, stride = parse_windows(args.windows)
    return extract_windows(cfg, args.checkpoint, args.input, args.out, length=length, stride=stride,
                           window_norm=args.window_norm, **common)


def _source(args: argparse.Namespace, overrides: list[str], report: dict) -> dict:
    """How the rows were made, so tools/search.py embeds a query the same way."""
    config = os.path.abspath(args.config) if os.path.isfile(args.config) else args.config
    windows = [report["protocol"]["length"], report["protocol"]["stride"]] if args.windows else None
    return {"config": config, "overrides": list(overrides), "checkpoint": os.path.abspath(args.checkpoint),
            "modality": args.modality, "model": report["model"], "embedding": report["embedding"],
            "normalize": bool(args.normalize), "layer": args.layer, "windows": windows,
            "window_norm": args.window_norm if args.windows else None}


if __name__ == "__main__":
    sys.exit(main())
