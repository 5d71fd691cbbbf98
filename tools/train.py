"""Train any mmmae method: ``deepspeed tools/train.py --config NAME.yaml [key=value ...]``.

Runs unchanged under the ``deepspeed`` launcher (one or many processes, ``--hostfile`` for nodes),
under ``torchrun``, under SLURM's ``srun`` (one task per process; see tools/slurm/train.sbatch), and as
plain ``python tools/train.py`` (one process).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML path, or the name of a packaged config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from mmmae.config import load_config_or_exit
    cfg = load_config_or_exit(args.config, overrides)
    from mmmae.engine.trainer import PREEMPTED_EXIT_CODE, Preempted, train
    try:
        summary = train(cfg)
    except Preempted as e:
        if rank == 0:
            logging.getLogger("mmmae.train").warning("%s; exiting with %d", e, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    if rank == 0:
        logging.getLogger("mmmae.train").info("finished at step %d; run directory %s", summary["step"],
                                              summary["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
