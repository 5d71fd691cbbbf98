"""Does it learn? Pretrained encoders against scratch on held-out data, on real Fashion-MNIST images and
moving Fashion-MNIST clips: ``python tools/study.py [--quick] [--out DIR]``.

Writes ``report.md`` (tables, setup, machine, timings), PNG plots and ``results.json`` (every run and
point, summaries, the pretrained-against-scratch checks) into ``--out`` (default ``runs/study``); the
runs themselves (configs, pretraining run directories) go under ``--out``/runs. The full study takes
about 45 minutes on 2 idle CPU cores, ``--quick`` (MAE against scratch at 1% and 10% of the labels, two
seeds) 2-3 minutes. See mmmae/engine/study.py for what is run.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small variant (minutes instead of an hour)")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    p.add_argument("--seed", type=int, default=0, help="first seed; the study runs it and the next (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmmae.engine.study import run_study
    results = run_study("quick" if args.quick else "full", args.out, seed=args.seed)
    log = logging.getLogger("mmmae.study")
    for c in results["checks"]:
        log.info("%s %s, %g of the labels: pretrained %.1f%% vs scratch %.1f%% (margin %+.1f, seed spread %.1f)",
                 c["group"], c["init"], c["labels"], c["pretrained"], c["scratch"], c["margin"], c["spread"])
    log.info("report: %s/report.md (%.1f min)", args.out, results["timing"]["total_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
