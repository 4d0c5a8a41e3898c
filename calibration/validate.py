"""``python -m calibration.validate``: score a bundle on data its settings may be chosen on, never ``test/``.

    python -m calibration.validate --model BUNDLE --data DIR [--defects 60] [--holdout 0.2] [--seed 0] [--json]

The set is the one calibration held out of DIR/train/good (``split_train`` with the bundle's
``model.holdout`` and ``model.seed``) plus ``--defects`` synthetic CutPaste, scar and NSA defects
made from those images, with their masks (``validation_pairs``, as trained methods stop on).
It is scored through the same Pipeline calibration uses (engines/pipeline.py, torch reference
runtime) and measured as DIR/test is (calibration/evaluate.py): image AUROC, pixel AUROC, pixel
AUPR, AUPRO, F1, overall and per defect kind. DIR/test is never read: compare settings (one
bundle per candidate) on these figures, and report test/ only for the one chosen.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from calibration.calibrate import reference_pipeline, split_train, validation_pairs
from calibration.data import read_image, train_samples
from calibration.defects import KINDS
from calibration.evaluate import Evaluation, Frame, evaluate_frames
from calibration.metrics import GOOD
from calibration.settings import ModelConfig
from engines.bundle import Bundle, load_bundle

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "n_images", "n_anomalous")


def validation_frames(data: Path, holdout: float, seed: int, defects: int) -> list[Frame]:
    """The held-out good images of DATA/train/good and ``defects`` synthetic defects made from them."""
    _, held_out = split_train([s.path for s in train_samples(data)], holdout, seed)
    pairs = validation_pairs([read_image(p) for p in held_out], defects, seed)
    frames = []
    for i, (img, mask) in enumerate(pairs):
        j = i - len(held_out)
        kind = GOOD if j < 0 else KINDS[j % len(KINDS)]  # synthesize_defects makes the kinds in turn
        frames.append((held_out[i].name if j < 0 else f"{kind}/{j:03d}", kind, img, mask))
    return frames


def validate(bundle: Bundle, data: Path, defects: int, holdout: float, seed: int,
             progress: bool = True) -> Evaluation:
    """The bundle on its held-out good images and synthetic defects, through the reference pipeline."""
    frames = validation_frames(data, holdout, seed, defects)
    held = bundle.manifest.score_stats.get("holdout_good", {}).get("n")
    n_good = len(frames) - defects
    if held is not None and held != n_good:
        raise ValueError(f"{bundle.path}: calibrated with {held} held-out images, this split holds {n_good}; "
                         f"give --holdout and --seed as the bundle was calibrated")
    return evaluate_frames(bundle, reference_pipeline(bundle), frames, len(frames), progress)


def main(argv: list[str] | None = None) -> int:
    defaults = ModelConfig.model_fields
    p = argparse.ArgumentParser(prog="python -m calibration.validate", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="DIR/train/good: the images the bundle was calibrated on")
    p.add_argument("--defects", type=int, default=defaults["validation_defects"].default,
                   help="synthetic defects made from the held-out images")
    p.add_argument("--holdout", type=float, default=defaults["holdout"].default,
                   help="model.holdout the bundle was calibrated with")
    p.add_argument("--seed", type=int, default=defaults["seed"].default,
                   help="model.seed the bundle was calibrated with")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    if args.defects < 1:
        p.error("--defects must be at least 1: without defects there is nothing to detect")
    bundle = load_bundle(args.model)
    ev = validate(bundle, args.data, args.defects, args.holdout, args.seed, progress=sys.stderr.isatty())
    result: dict[str, Any] = {
        "bundle": str(bundle.path), "model_id": bundle.manifest.model_id, "method": bundle.manifest.method,
        **{k: getattr(ev.metrics["overall"], k) for k in KEYS},
        "per_kind": {k: {key: getattr(m, key) for key in KEYS} for k, m in ev.metrics["per_type"].items()},
        "ms_per_image": ev.ms_per_image}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model_id']} ({result['method']}): held-out good {result['n_images'] - result['n_anomalous']}"
              f" + synthetic defects {result['n_anomalous']}")
        for name, m in [("overall", result), *result["per_kind"].items()]:
            print(f"  {name:9s} " + "  ".join(f"{k} {_fmt(m[k])}" for k in KEYS[:5]))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
