"""Nearest neighbours of a query in an index written by ``tools/extract.py --index``.

python tools/search.py --index PREFIX|DIR --query TEXT|IMAGE|VIDEO [--k 10] [--json] \
    [--config CFG] [--checkpoint CKPT] [--modality text|image|video] [--nprobe N] [key=value ...]

The query is embedded with the model, config (and its overrides), layer, window length and
normalisation the index records (``--config`` / ``--checkpoint`` override them; extra key=value
overrides apply on top). Its kind comes from the string: a path to an image or video file is that, anything
else is a caption (``--modality`` forces one). Prints one line per match, best first:
``rank<TAB>score<TAB>id`` (``--json``: a JSON object with the query, the index and the matches). Scores
are inner products (cosine similarities when the rows were extracted with --normalize).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from mmmae.config import load_config


def run_search(index_path: str, query: str, *, k: int = 10, modality: str | None = None, config: str | None = None,
               checkpoint: str | None = None, overrides: list[str] | None = None, nprobe: int | None = None,
               available: int | None = None) -> dict[str, Any]:
    """Embed ``query`` as the index's rows were and return ``{"query", "modality", "index", "matches":
    [{"rank", "id", "score", "row"}]}``, best first."""
    from mmmae.index import load_index, resolve_index, search
    from mmmae.embedding import embed_query, query_modality

    index, meta, ids = load_index(index_path, available=available)
    src = meta["source"]
    modality = modality or query_modality(query)
    cfg = load_config(config or src["config"], [*(src["overrides"] if config is None else []), *(overrides or [])])
    ckpt, layer, normalize = checkpoint or src["checkpoint"], src.get("layer"), bool(src.get("normalize"))
    if modality == "video" and src.get("windows"):  # rows are windows: the query is its middle window
        from mmmae.video.extract import embed_window_query
        vec = embed_window_query(cfg, ckpt, query, length=int(src["windows"][0]), layer=layer,
                                 window_norm=src.get("window_norm") or "none", normalize=normalize)
    else:
        vec = embed_query(cfg, ckpt, query, modality, layer=layer, normalize=normalize)
    if vec.shape[1] != meta["dim"]:
        raise ValueError(f"the {modality} query embeds to {vec.shape[1]} dims but the index rows have {meta['dim']} "
                         f"(model {cfg.model.name!r}); give the --config/--checkpoint the index was built with")
    scores, rows = search(index, vec.numpy(), k, nprobe=nprobe)
    matches = [{"rank": r + 1, "id": ids[int(i)], "score": float(s), "row": int(i)}
               for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]
    return {"query": query, "modality": modality, "index": str(resolve_index(index_path)), "kind": meta["kind"],
            "rows": meta["rows"], "matches": matches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="the index prefix, its .index.json, or a folder holding one")
    p.add_argument("--query", required=True, help="a caption, or the path of an image or a video")
    p.add_argument("--k", type=int, default=10, help="matches to return (default 10)")
    p.add_argument("--modality", choices=("text", "image", "video"), default=None, help="force the query's kind")
    p.add_argument("--config", default=None, help="override the config recorded in the index")
    p.add_argument("--checkpoint", default=None, help="override the checkpoint recorded in the index")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to search (default: the index's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_search(args.index, args.query, k=args.k, modality=args.modality, config=args.config,
                            checkpoint=args.checkpoint, overrides=overrides, nprobe=args.nprobe)
    except (ValueError, FileNotFoundError, KeyError, MemoryError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write("".join(f"{m['rank']}\t{m['score']:.6f}\t{m['id']}\n" for m in result["matches"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
