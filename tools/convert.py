"""Convert a checkpoint of the config's model to a Hugging Face directory, a timm state dict or the
official repository's layout.

python tools/convert.py --config CFG --checkpoint SRC --to hf|timm|official --out DIR \
    [--hf-class NAME] [--part all|encoder] [--layout auto|NAME] [key=value ...]

SRC is anything mmmae.weights reads: a run's model.safetensors or folder, a DeepSpeed checkpoint
folder, an official MAE / VideoMAE / VideoMAEv2 / OmniMAE / SimMIM file, a timm state dict or a Hugging
Face directory (.pth, .bin, .safetensors). It is loaded strictly into the config's model first (a
checkpoint of another size is an error naming the keys), then written:

- hf: config.json + model.safetensors for transformers' from_pretrained (--hf-class: ViTMAEForPreTraining,
  ViTModel, ViTForImageClassification, VideoMAEForPreTraining, VideoMAEModel, VideoMAEForVideoClassification;
  default from the model);
- timm: model.safetensors + timm_config.json (the timm.create_model name and arguments; load with
  pretrained=True, pretrained_cfg_overlay=dict(file=DIR/model.safetensors, num_classes=N));
- official: checkpoint.pth ({"model": state}) in facebookresearch/mae or MCG-NJU/VideoMAE names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from mmmae.weights import FORMATS, HF_CLASSES, LAYOUTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the config whose model the checkpoint belongs to")
    p.add_argument("--checkpoint", required=True, help="the weights, in any layout mmmae.weights reads")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--hf-class", default=None, choices=HF_CLASSES)
    p.add_argument("--part", default="all", choices=("all", "encoder"), help="encoder: export the encoder only")
    p.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="the checkpoint's layout")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    from mmmae.config import model_cfg
    from mmmae.registry import build_from_cfg
    from mmmae.weights import export, load
    try:
        model = build_from_cfg(cfg.model.name, model_cfg(cfg.model)).eval()
        report = load(model, args.checkpoint, layout=args.layout, part=args.part)
        written = export(model, args.to, args.out, hf_class=args.hf_class, part=args.part)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("mmmae.convert").info(
        "%s (%s, %d weights) -> %s %s", args.checkpoint, report.variant, len(report.loaded), args.out,
        json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
