"""The one console command, ``inspection-agent`` (also ``python -m agent``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import yaml

from agent import exit_codes
from agent.config import Config, ConfigError, load_config, preflight, to_dict

log = logging.getLogger("agent")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return exit_codes.CONFIG
    except (ValueError, FileNotFoundError) as e:
        # Data, bundle and argument errors carry their own precise message. ``run`` raises
        # these only before READY; after it, the service maps its own failures.
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CONFIG
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        log.exception("%s failed", args.command)
        return exit_codes.FAILURE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inspection-agent", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", type=Path, default=None, help="configuration file (default: built-in defaults)")
        sp.set_defaults(func=func)
        return sp

    sp = add("check-config", cmd_check_config, "validate a configuration file and print it resolved")
    sp = add("calibrate", cmd_calibrate, "fit a model on DIR/train/good and write a bundle")
    sp.add_argument("--data", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--method", default=None, help="overrides model.method")
    sp.add_argument("--tiled", action="store_true", help="overrides model.tiling.enabled")
    sp = add("evaluate", cmd_evaluate, "evaluate a bundle on DIR/test")
    sp.add_argument("--model", type=Path, required=True)
    sp.add_argument("--data", type=Path, required=True)
    sp.add_argument("--backend", default=None, help="overrides runtime.backend (auto|torch|onnxruntime|tensorrt)")
    sp.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    sp.add_argument("--report", type=Path, default=None, help="write the report (HTML, curves, heatmaps) here")
    sp.add_argument("--no-mask", action="store_true", help="score without the bundle's object mask (to compare)")
    for name, mod in (("run", "agent.service"), ("build-engine", "engines.build"), ("bench", "engines.bench")):
        try:
            module = __import__(mod, fromlist=["add_arguments", "command"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.add_arguments(add(name, module.command, module.__doc__.splitlines()[0]))
    return p


def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    preflight(cfg, args.config, serving=cfg.agent.model is not None)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_calibrate(args: argparse.Namespace, cfg: Config) -> int:
    from calibration.calibrate import calibrate

    if args.method:
        cfg.model.method = args.method
    if args.tiled:
        cfg.model.tiling.enabled = True
    preflight(cfg, args.config)
    bundle = calibrate(args.data, args.out, cfg.model, progress=sys.stderr.isatty())
    m = bundle.manifest
    print(json.dumps({"bundle": str(bundle.path), "model_id": m.model_id, "method": m.method,
                      "threshold": m.threshold["threshold"], "fit": m.score_stats.get("fit")}))
    return 0


def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from calibration.evaluate import evaluate, write_outputs
    from engines.bundle import load_bundle
    from engines.runtimes import open_backend
    from engines.scorer import Scorer

    bundle = load_bundle(args.model)
    rt = cfg.runtime
    backend, why = open_backend(bundle, args.backend or rt.backend, rt.device, rt.threads, rt.fallback)
    log.info("%s", why)
    ev = evaluate(bundle, Scorer(bundle, backend, rt.batch_size, use_mask=not args.no_mask), args.data,
                  progress=sys.stderr.isatty())
    summary = write_outputs(ev, bundle, backend.name, args.report)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    if args.report:
        log.info("report written to %s", args.report / "index.html")
    return 0


def _print_table(summary: dict) -> None:
    cols = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "n_images")
    print(f"{'set':<12}" + "".join(f"{c:>13}" for c in cols))
    rows = [("overall", summary)] + list(summary["per_type"].items())
    for name, m in rows:
        print(f"{name:<12}" + "".join(f"{_fmt(m.get(c)):>13}" for c in cols))


def _fmt(v: object) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
