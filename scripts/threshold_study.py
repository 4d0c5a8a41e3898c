"""Threshold from synthetic defects vs from real defects: false-reject and miss rates on a test set.

    python scripts/threshold_study.py --model BUNDLE --data DIR [--synthetic 60] [--holdout 0.2] [--seed 0]

Three thresholds for the same bundle, each judged on DIR/test (false-reject rate on test/good,
miss rate on the defects):

- "synthetic": F1-max on the held-out good images (the same split calibrate used, from
  --holdout and --seed) plus ``--synthetic`` synthetic defects made from them; what a plant
  without defect samples gets from ``model: {synthetic_defects: N, threshold: {policy: f1}}``.
- "real": F1-max on the real test scores themselves (an optimistic reference: chosen on the
  data it is judged on).
- "bundle": the threshold the bundle was calibrated with (its own policy).

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.calibrate import reference_pipeline, score_images, split_train  # noqa: E402
from calibration.data import read_image, test_samples, train_samples  # noqa: E402
from calibration.defects import synthesize_defects  # noqa: E402
from calibration.metrics import f1_max_threshold  # noqa: E402
from calibration.thresholds import ThresholdConfig, choose_threshold  # noqa: E402
from engines.bundle import load_bundle  # noqa: E402


def rates(threshold: float, good: np.ndarray, defects: np.ndarray) -> dict[str, float]:
    """NG means score >= threshold."""
    return {"threshold": float(threshold), "false_reject_rate": float(np.mean(good >= threshold)),
            "miss_rate": float(np.mean(defects < threshold))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--synthetic", type=int, default=60, help="synthetic defects made from the held-out good images")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    bundle = load_bundle(args.model)
    progress = sys.stderr.isatty()
    pipeline = reference_pipeline(bundle, args.batch_size)

    def scores_of(images: list, desc: str) -> np.ndarray:
        return np.array([fs.score for fs in score_images(pipeline, images, progress, desc)])

    _, val_paths = split_train([s.path for s in train_samples(args.data)], args.holdout, args.seed)
    val_images = [read_image(path) for path in val_paths]
    held_out_good = scores_of(val_images, "held-out good")
    synthetic = synthesize_defects(val_images, args.synthetic, np.random.default_rng(args.seed))
    synthetic_scores = scores_of([img for img, _ in synthetic], "synthetic")
    from_synthetic = choose_threshold(ThresholdConfig(policy="f1"), held_out_good, synthetic_scores)

    samples = test_samples(args.data)
    scores = scores_of([read_image(s.path) for s in samples], "test")
    labels = np.array([s.label for s in samples])
    good, defects = scores[labels == 0], scores[labels == 1]
    from_real, _ = f1_max_threshold(scores, labels)

    print(json.dumps({
        "model_id": bundle.manifest.model_id, "method": bundle.manifest.method, "data": str(args.data),
        "n_test_good": int(good.size), "n_test_defect": int(defects.size),
        "n_held_out_good": len(val_images), "n_synthetic": args.synthetic,
        "synthetic": {**rates(from_synthetic.threshold, good, defects),
                      "on_calibration_set": {"false_reject_rate": from_synthetic.false_reject_rate,
                                             "miss_rate": from_synthetic.miss_rate}},
        "real": rates(from_real, good, defects),
        "bundle": {**rates(bundle.manifest.decision.image_threshold, good, defects),
                   "policy": bundle.manifest.decision.policy},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
