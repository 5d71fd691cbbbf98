"""Evaluate a classifier (fine-tuned or linear probe) on the config's validation split.

python tools/eval_classification.py --config CFG --checkpoint CKPT --out REPORT.json [key=value ...]

The one evaluation runner (mmmae.evaluation.classify) reads the split through the configured source:
images, or videos with their test views (tools/eval_kinetics.py is the same runner with the video
protocol's options).
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
    p.add_argument("--out", required=True)
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    from mmmae.metrics import write_report
    from mmmae.evaluation import classify
    report = classify(cfg, args.checkpoint)
    write_report(report, args.out)
    m = report["metrics"]
    logging.getLogger("mmmae.eval").info("top1 %.2f  top5 %.2f  mean class acc %.2f on %d images -> %s",
                                         m["top1"], m["top5"], m["mean_class_acc"], report["num_evaluated"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
