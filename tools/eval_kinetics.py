"""Multi-view test of a fine-tuned video classifier (VideoMAE's Kinetics / Something-Something v2 protocol).

python tools/eval_kinetics.py --config CFG --checkpoint CKPT --out REPORT.json [key=value ...]

Every video of the configured source's val split (``data.dataset``: ``video_list`` reads ``data.val_list``
as ``path label`` lines under ``data.root``; ``ssv2`` reads ``validation.json`` with ``labels.json`` as
``data.class_list``) is scored on ``data.num_clips`` temporal clips x ``data.num_crops`` spatial crops, short
side resized to the crop size (bilinear, no antialias, as VideoMAE's cv2 resize). Clips follow
``data.sampling``: dense clips on VideoMAE's stride grid (Kinetics, 5 x 3), or one frame per segment
(SSv2, 2 x 3: configs/finetune_ssv2.yaml). Per-view softmax scores are averaged per video. The report has
top-1, top-5 and mean per-class accuracy, the protocol, each video's prediction, and the videos that could
not be read.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True,
                   help="a run's model.safetensors or folder, a DeepSpeed checkpoint folder, or an official / timm / Hugging Face checkpoint (any layout mmmae.weights reads)")
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--views-per-forward", type=int, default=16)
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    from mmmae.evaluation import classify
    report = classify(cfg, args.checkpoint, views_per_forward=args.views_per_forward)
    from mmmae.metrics import write_report
    write_report(report, args.out)
    m = report["metrics"]
    logging.getLogger("mmmae.eval").info(
        "top1 %.2f  top5 %.2f  mean class acc %.2f  (%d videos, %d unreadable) -> %s", m["top1"], m["top5"],
        m["mean_class_acc"], report["num_evaluated"], report["num_unreadable"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
