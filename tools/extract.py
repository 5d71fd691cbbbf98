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
mean-pooled encoder features (no text). See mmmae.vl.extract for the full table.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training config (a path or a packaged name)")
    p.add_argument("--checkpoint", required=True, help="model.safetensors (or a checkpoint file) of a run")
    p.add_argument("--modality", required=True, choices=("video", "image", "text"))
    p.add_argument("--input", required=True, help="a folder, a list file, a caption text file or a COCO json")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.npy, PREFIX.ids.txt, PREFIX.report.json")
    p.add_argument("--normalize", action="store_true", help="L2-normalise every row")
    p.add_argument("--root", default=None, help="prefix for relative paths in list files (default data.root)")
    p.add_argument("--batch-size", type=int, default=0, help="inputs per forward (default data.batch_size)")
    p.add_argument("--no-progress", action="store_true")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    from mmmae.vl.extract import extract
    try:
        report = extract(cfg, args.checkpoint, args.modality, args.input, args.out, normalize=args.normalize,
                         root=args.root, batch_size=args.batch_size or None, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("mmmae.extract").info(
        "%d of %d %ss embedded (%d skipped), dim %d: %s -> %s.npy", report["num_embedded"], report["num_inputs"],
        args.modality, report["num_skipped"], report["dim"], report["embedding"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
