"""COCO-protocol image-text retrieval of a trained model.

python tools/eval_retrieval.py --config CFG --checkpoint CKPT --out REPORT.json [key=value ...]

The split is ``data.val_captions`` / ``data.val_images``: an official COCO captions json, the Karpathy
``dataset_coco.json`` (``--split test``, the 5k test images, by default) or csv/jsonl pairs. Every image
keeps its first 5 captions (``--max-captions-per-image``). A ``retrieval`` config scores the fine-tuned
joint space; an ``m3ae`` config scores the pooled encoder features of images and captions alone.
The report has i2t/t2i recall@1/5/10 (percent), rsum and median ranks, the protocol (split, numbers of
images and captions), the checkpoint, and the images that could not be read (listed and left out).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training config (a path or a packaged name)")
    p.add_argument("--checkpoint", required=True,
                   help="a run's model.safetensors or folder, a DeepSpeed checkpoint folder, or an official / timm / Hugging Face checkpoint (any layout mmmae.weights reads)")
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--split", default="test", help="Karpathy split to score (test, val); other formats: the whole file")
    p.add_argument("--max-captions-per-image", type=int, default=5, help="0 keeps every caption")
    p.add_argument("--batch-size", type=int, default=0, help="images / captions per forward (default data.batch_size)")
    p.add_argument("--no-progress", action="store_true")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    from mmmae.vl.evaluation import evaluate_retrieval
    try:
        report = evaluate_retrieval(cfg, args.checkpoint, split=args.split,
                                    max_captions_per_image=args.max_captions_per_image,
                                    batch_size=args.batch_size or None, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mmmae.metrics import write_report
    write_report(report, args.out)
    m, pr = report["metrics"], report["protocol"]
    logging.getLogger("mmmae.eval").info(
        "i2t R@1/5/10 %.2f/%.2f/%.2f  t2i R@1/5/10 %.2f/%.2f/%.2f  rsum %.2f  (%d images, %d captions, "
        "%d unreadable) -> %s", m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["t2i_r1"], m["t2i_r5"], m["t2i_r10"],
        m["rsum"], pr["num_images_scored"], pr["num_captions_scored"], report["num_unreadable"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
