"""``inspection-agent predict``: score a folder of images (or one image) with no broker, the commissioning tool.

Under ``--out`` it writes:

``overlays/<path>.jpg``
    each judged image's overlay (agent/overlay.py), ``<path>`` being the image's path under ``--input``;
``verdicts.csv``
    one row per image: file, frame_id, status, image_score, threshold, normalized_score, regions (how
    many), overlay (its path under ``--out``), error;
``verdicts.json``
    the verdicts, in the same order, each as on MQTT (agent/verdict.schema.json).

Images are read as the agent reads them (agent/decode.py, with ``source.max_pixels`` and
``source.grey``): a corrupt, oversized or odd file is an ``error`` verdict and the run goes on. A
folder is searched recursively, in path order; the frame id is the path under it (the file name
for a single file). Frames go through the same Pipeline and decision as on the line
(``runtime`` settings, ``--backend`` to override). A bar shows progress on a terminal; the summary
is one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from agent import overlay
from agent.config import Config
from agent.decode import FrameError, read_image
from agent.frames import Frame
from agent.inspector import Inspector
from calibration.data import IMAGE_SUFFIXES
from engines.bundle import load_bundle
from engines.pipeline import Pipeline
from engines.runtimes import open_backend

__all__ = ["command"]

log = logging.getLogger(__name__)

CSV_COLUMNS = ["file", "frame_id", "status", "image_score", "threshold", "normalized_score", "regions", "overlay",
               "error"]


def command(args: argparse.Namespace, cfg: Config) -> int:
    images = _images(args.input)
    bundle = load_bundle(args.model)
    if args.backend:
        cfg.runtime.backend = args.backend
    backend, why = open_backend(bundle, cfg.runtime)
    log.info("%s", why)
    inspector = Inspector(bundle, Pipeline(bundle, backend, cfg.runtime))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"ok": 0, "ng": 0, "error": 0}
    verdicts = []
    with open(out / "verdicts.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(CSV_COLUMNS)
        for seq, (path, frame_id) in enumerate(tqdm(images, desc="predict", unit="image",
                                                    disable=not sys.stderr.isatty())):
            inspection = inspector.inspect(_frame(path, frame_id, seq, cfg))
            verdict = inspection.verdict
            image = overlay.render(inspection, "overlay", cfg.agent.image_max_side)
            written = None
            if image is not None:
                written = Path("overlays") / f"{frame_id}.jpg"
                (out / written).parent.mkdir(parents=True, exist_ok=True)
                (out / written).write_bytes(overlay.encode(image, "jpeg"))
            rows.writerow([path, frame_id, verdict.status, verdict.image_score, verdict.threshold,
                           verdict.normalized_score, len(verdict.regions), written or "", verdict.error or ""])
            verdicts.append(verdict.to_dict())
            counts[verdict.status] += 1
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    print(json.dumps({"images": len(images), **counts, "model_id": inspector.model.id, "backend": backend.name,
                      "out": str(out)}))
    return 0


def _images(given: Path) -> list[tuple[Path, str]]:
    """(file, frame id) of every image to score, in path order."""
    given = Path(given)
    if given.is_file():
        return [(given, given.name)]
    if not given.is_dir():
        raise FileNotFoundError(f"--input: no such file or folder: {given}")
    files = sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--input: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {given}")
    return [(p, p.relative_to(given).as_posix()) for p in files]


def _frame(path: Path, frame_id: str, seq: int, cfg: Config) -> Frame:
    try:
        return Frame(frame_id, seq, "predict", read_image(path, cfg.source.max_pixels, cfg.source.grey),
                     meta={"path": str(path)})
    except FrameError as e:
        return Frame(frame_id, seq, "predict", None, meta={"path": str(path)}, error=str(e))
