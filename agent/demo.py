"""The demo: synthetic sample data, a calibrated model, and its evaluation.

Everything is written under ``demo/`` (or ``--workdir``); nothing needs ../shared.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from agent.config import ModelConfig
from calibration.calibrate import calibrate
from calibration.evaluate import evaluate, write_outputs
from calibration.synthetic import write_dataset
from engines.bundle import load_bundle
from engines.runtimes import open_backend
from engines.scorer import Scorer

log = logging.getLogger("agent.demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("demo"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = args.workdir / "data"
    if not (data / "train" / "good").is_dir():
        write_dataset(data, seed=0)
    bundle_dir = args.workdir / "bundle"
    calibrate(data, bundle_dir, ModelConfig())
    bundle = load_bundle(bundle_dir)
    backend, why = open_backend(bundle)
    log.info("%s", why)
    ev = evaluate(bundle, Scorer(bundle, backend), data)
    summary = write_outputs(ev, bundle, backend.name, args.workdir / "report")
    print(json.dumps({k: summary[k] for k in ("model_id", "image_auroc", "pixel_auroc", "pixel_aupr", "aupro")}))
    log.info("report: %s", args.workdir / "report" / "index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
