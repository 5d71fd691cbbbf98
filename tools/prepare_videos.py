"""Re-encode a video dataset for fast random access: H.264, short side N, a keyframe every G frames.

python tools/prepare_videos.py --input LIST_OR_FOLDER [--root DIR] --out DIR [--short-side 320] [--gop 16]
    [--workers N] [--crf 23] [--preset veryfast] [--class-list FILE] [--shards] [--shard-size 1000]

--input: a folder (every video under it, recursively; labels -1) or a Kinetics-style list
(``path label`` lines or ``path,label`` CSV; paths relative to --root, default the current
directory; labels are integers or, with --class-list, class names).

Writes into --out:
- the re-encoded videos, at their input paths relative to the folder / --root with a ``.mp4``
  extension: upright (rotation metadata applied), short side ``--short-side`` (the long side keeps
  the aspect ratio, rounded to an even size for yuv420p), every frame kept in order, timestamps
  rewritten at the source's average frame rate, audio dropped; a keyframe exactly every ``--gop``
  frames (x264 keyint = min-keyint = G, scene-cut keyframes off, source picture types ignored), so
  a seek decodes at most G - 1 frames before the one asked for;
- the new annotation list (``<input list stem>.txt``, ``videos.txt`` for a folder; ``.csv`` when a
  path holds whitespace or a comma) with paths relative to --out, without the inputs that could not
  be read;
- ``prepare_report.json``: settings, counts, and every unreadable input with its reason;
- with ``--shards``: WebDataset-style tar shards ``shards/videos-NNNNNN.tar`` (members
  ``<key>.mp4`` and ``<key>.json`` = {"label", "path"}; keys number the list's lines) and
  ``shards.txt`` naming them relative to --out.

Resumable: a finished video is skipped on a rerun (outputs are written to a temporary name and
renamed when complete and checked), shards and lists are rebuilt; a rerun with other encoding
settings into the same --out is refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from typing import Any, Iterator

log = logging.getLogger("mmmae.prepare_videos")

REPORT = "prepare_report.json"
SETTING_KEYS = ("short_side", "gop", "crf", "preset")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a folder of videos or an annotation list")
    p.add_argument("--root", default="", help="prefix of the list's relative paths (default: current directory)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--class-list", default="", help="class names, one a line, for lists that name classes")
    p.add_argument("--short-side", type=int, default=320, help="output short side in pixels (even)")
    p.add_argument("--gop", type=int, default=16, help="keyframe interval in frames")
    p.add_argument("--crf", type=int, default=23, help="x264 constant rate factor (0-51; 23 is x264's default)")
    p.add_argument("--preset", default="veryfast", help="x264 preset (ultrafast ... placebo)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--shards", action="store_true", help="also write WebDataset-style tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="videos per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    checks = [("--short-side", args.short_side, args.short_side >= 2 and args.short_side % 2 == 0,
               "an even number >= 2 (yuv420p needs even sizes)"),
              ("--gop", args.gop, args.gop >= 1, ">= 1"), ("--crf", args.crf, 0 <= args.crf <= 51, "in 0..51"),
              ("--workers", args.workers, args.workers >= 1, ">= 1"),
              ("--shard-size", args.shard_size, args.shard_size >= 1, ">= 1")]
    for flag, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{flag}={value}: must be {allowed}")
    return args


def collect_inputs(args: argparse.Namespace) -> tuple[list[tuple[str, str, int]], str, str]:
    """``(source path, output path relative to --out, label)`` per input, the new list's name, and
    the folder the inputs' paths are relative to."""
    from mmmae.video.datasets import list_video_folder, read_annotation_list

    if os.path.isdir(args.input):
        base = os.path.abspath(args.input)
        items, list_name = list_video_folder(base), "videos"
    elif os.path.isfile(args.input):
        base = os.path.abspath(args.root or os.getcwd())
        items = read_annotation_list(args.input, base, args.class_list or None)
        list_name = os.path.splitext(os.path.basename(args.input))[0]
    else:
        raise FileNotFoundError(f"--input {args.input!r} is neither a folder nor a list file")
    if not items:
        raise ValueError(f"--input {args.input!r}: no videos")
    jobs, seen = [], {}
    for src, label in items:
        rel = os.path.relpath(src, base)
        if rel.startswith(os.pardir + os.sep):
            raise ValueError(f"{src} lies outside {base}: give --root the folder that holds every listed video")
        out_rel = os.path.splitext(rel)[0] + ".mp4"
        if out_rel in seen and seen[out_rel] != src:
            raise ValueError(f"{seen[out_rel]} and {src} would both become {out_rel}")
        seen[out_rel] = src
        jobs.append((src, out_rel, label))
    return jobs, list_name, base


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) with the short side ``short_side`` and the long side scaled to keep the aspect ratio,
    rounded half up to an even number as FFmpeg's ``scale=-2:N`` does (av_rescale to the nearest;
    yuv420p subsamples chroma by 2 in both directions): 340 x 256 -> 426 x 320."""
    short, long = min(width, height), max(width, height)
    scaled = max(2, 2 * ((long * short_side + short) // (2 * short)))
    return (short_side, scaled) if width <= height else (scaled, short_side)


def _upright(frame: Any) -> Any:
    """A decoded frame turned as its rotation metadata says (as mmmae.video.decoding's readers
    show it), as a new frame; the frame itself when it carries no rotation."""
    import av
    import numpy as np

    k = int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
    if not k:
        return frame
    # frame.rotation is counter-clockwise degrees: k counter-clockwise quarter turns (PyAVReader._to_tensor).
    img = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), k, axes=(0, 1)))
    return av.VideoFrame.from_ndarray(img, format="rgb24")


def _frames(path: str, threads: int) -> Iterator[Any]:
    """Decoded frames in presentation order, as PyAVReader counts them (discarded packets left out)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        for packet in container.demux(stream):
            if packet.is_discard:
                continue
            yield from packet.decode()


def encode_video(src: str, dst: str, settings: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Re-encode ``src`` into ``dst`` (skipped when ``dst`` exists). Returns what happened:
    ``{"path", "status": "done" | "skipped" | "failed", "error", "frames", "size"}``."""
    import av
    from av.video.frame import PictureType

    from mmmae.video.decoding import VideoDecodeError, open_video

    result: dict[str, Any] = {"path": src, "output": dst, "status": "skipped", "error": None}
    if os.path.exists(dst):
        return result
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        # PyAV's reader first: it refuses truncated files that FFmpeg would decode quietly up to the cut.
        with open_video(src, "pyav") as reader:
            expected, fps = reader.num_frames, reader.fps
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        count, size = 0, None
        with av.open(tmp, "w", format="mp4") as out:
            stream = None
            for frame in _frames(src, threads):
                frame = _upright(frame)
                if stream is None:
                    size = output_size(frame.width, frame.height, settings["short_side"])
                    stream = _add_stream(out, rate, size, settings, threads)
                picture = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
                picture.pts, picture.time_base = count, 1 / rate
                # The source's I-frame marks would force extra keyframes (FFmpeg's libx264 honours
                # pict_type): leave the keyframe placement to keyint alone.
                picture.pict_type = PictureType.NONE
                out.mux(stream.encode(picture))
                count += 1
            if stream is None:
                raise VideoDecodeError(src, "no video frames")
            out.mux(stream.encode())
        if count != expected:
            raise VideoDecodeError(src, f"decoded {count} frames, the index lists {expected}")
        with open_video(tmp, "pyav") as check:
            if check.num_frames != count:
                raise VideoDecodeError(src, f"re-encoded file holds {check.num_frames} frames, {count} were written")
        os.replace(tmp, dst)
        result.update(status="done", frames=count, size=list(size))
    except (VideoDecodeError, av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        reason = e.reason if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {e}"
        result.update(status="failed", error=reason)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return result


def _add_stream(out: Any, rate: Fraction, size: tuple[int, int], settings: dict[str, Any], threads: int) -> Any:
    gop = settings["gop"]
    # keyint = min-keyint = G and no scene-cut keyframes: a keyframe exactly every G frames.
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
    stream = out.add_stream("libx264", rate=rate, options={
        "crf": str(settings["crf"]), "preset": settings["preset"], "x264-params": params})
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    stream.codec_context.gop_size = gop
    stream.thread_count = threads
    return stream


def _encode_job(job: tuple[str, str, dict[str, Any], int]) -> dict[str, Any]:
    return encode_video(*job)


def run_jobs(jobs: list[tuple[str, str, dict[str, Any], int]], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Encode every job (in ``workers`` processes), with a tqdm bar; results in job order."""
    from tqdm import tqdm

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), unit="video", disable=not progress)
    if workers == 1:
        for k, job in enumerate(jobs):
            results[k] = _encode_job(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_encode_job, job): k for k, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return [r for r in results if r is not None]


def write_list(out: str, name: str, rows: list[tuple[str, int]]) -> str:
    """The annotation list, paths relative to ``out``; CSV when a path would break the space form."""
    if any(any(c.isspace() for c in rel) or "," in rel for rel, _ in rows):
        path = os.path.join(out, name + ".csv")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        path = os.path.join(out, name + ".txt")
        text = "".join(f"{rel} {label}\n" for rel, label in rows)
    _write_atomic(path, text.encode("utf-8"))
    return path


def write_shards(out: str, rows: list[tuple[str, int]], shard_size: int) -> list[str]:
    """Tar shards of the re-encoded files (``<key>.mp4`` + ``<key>.json``) and ``shards.txt``."""
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    names = []
    for s, start in enumerate(range(0, len(rows), shard_size)):
        name = os.path.join("shards", f"videos-{s:06d}.tar")
        tmp = os.path.join(out, name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for key, (rel, label) in enumerate(rows[start:start + shard_size], start):
                stem = f"{key:09d}"  # keys hold no dot: WebDataset splits a member's name at its first one
                tar.add(os.path.join(out, rel), arcname=stem + ".mp4")
                meta = json.dumps({"label": label, "path": rel}).encode("utf-8")
                info = tarfile.TarInfo(stem + ".json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
        os.replace(tmp, os.path.join(out, name))
        names.append(name)
    _write_atomic(os.path.join(out, "shards.txt"), "".join(n + "\n" for n in names).encode("utf-8"))
    return names


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _check_settings(out: str, settings: dict[str, Any]) -> None:
    path = os.path.join(out, REPORT)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        before = json.load(f).get("settings", {})
    changed = {k: (before.get(k), settings[k]) for k in SETTING_KEYS if before.get(k) != settings[k]}
    if changed:
        raise ValueError(f"{out} holds videos encoded with other settings {changed} (before, now): "
                         "choose another --out or remove it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = {"short_side": args.short_side, "gop": args.gop, "crf": args.crf, "preset": args.preset}
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    _check_settings(out, settings)
    inputs, list_name, base = collect_inputs(args)
    # One decoder/encoder thread per process when several processes share the cores; FFmpeg's choice otherwise.
    threads = 1 if args.workers > 1 else 0
    jobs = [(src, os.path.join(out, rel), settings, threads) for src, rel, _ in inputs]
    results = run_jobs(jobs, args.workers, progress=not args.no_progress)
    failed = [{"path": r["path"], "error": r["error"]} for r in results if r["status"] == "failed"]
    bad = {f["path"] for f in failed}
    rows = [(rel, label) for src, rel, label in inputs if src not in bad]
    list_path = write_list(out, list_name, rows)
    shards = write_shards(out, rows, args.shard_size) if args.shards and rows else []
    report = {
        "input": os.path.abspath(args.input), "root": base,
        "settings": settings, "total": len(results),
        "converted": sum(r["status"] == "done" for r in results),
        "skipped_existing": sum(r["status"] == "skipped" for r in results),
        "failed": failed, "list": os.path.relpath(list_path, out), "shards": shards,
    }
    _write_atomic(os.path.join(out, REPORT), json.dumps(report, indent=1).encode("utf-8"))
    log.info("%d converted, %d already done, %d unreadable (listed in %s); list: %s", report["converted"],
             report["skipped_existing"], len(failed), os.path.join(out, REPORT), list_path)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
