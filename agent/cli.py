"""The one console command, ``inspection-agent`` (also ``python -m agent``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import yaml

from agent import exit_codes
from agent.config import Config, ConfigError, load_config, preflight, to_dict
from agent.verdict import SCHEMA_VERSION

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
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()} (verdict schema {SCHEMA_VERSION})")
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
    sp.add_argument("--method", default=None, help="overrides model.method's kind (a different method starts from "
                                                    "its defaults)")
    sp.add_argument("--tiled", action="store_true", help="overrides model.tiling.enabled")
    sp = add("evaluate", cmd_evaluate, "evaluate a bundle on DIR/test")
    sp.add_argument("--model", type=Path, required=True)
    sp.add_argument("--data", type=Path, required=True)
    sp.add_argument("--backend", default=None,
                    help="overrides runtime.backend (auto|torch|onnxruntime|openvino|tensorrt)")
    sp.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    sp.add_argument("--report", type=Path, default=None, help="write the report (HTML, curves, heatmaps) here")
    sp.add_argument("--no-mask", action="store_true", help="score without the bundle's object mask (to compare)")
    sp = add("run", cmd_run, "the service: frames from source, verdicts and images to MQTT, the archive and the "
                             "live page")
    sp.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = no limit)")
    sp = add("predict", cmd_predict, "score a folder or an image with no broker: overlays, verdicts.csv, verdicts.json")
    sp.add_argument("--model", type=Path, required=True, help="the bundle directory")
    sp.add_argument("--input", type=Path, required=True, help="an image, or a folder of images (searched recursively)")
    sp.add_argument("--out", type=Path, required=True, help="folder for overlays/, verdicts.csv and verdicts.json")
    sp.add_argument("--backend", default=None, help="overrides runtime.backend (auto|torch|onnxruntime|openvino|tensorrt)")
    sp = add("build-engine", cmd_build_engine, "compile the bundle's score graph into a TensorRT plan for this GPU")
    sp.add_argument("--model", type=Path, required=True, help="the bundle directory")
    sp.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    sp.add_argument("--batch", type=int, default=8, help="largest batch the plan serves (profile 1..N)")
    sp.add_argument("--data", type=Path, default=None,
                    help="good images for INT8 calibration: DIR/train/good or a folder of images")
    sp.add_argument("--calibration-images", type=int, default=64, help="INT8: how many good images to use")
    sp.add_argument("--workspace-mb", type=int, default=2048, help="builder workspace memory pool limit")
    sp = add("bench", cmd_bench, "benchmark the frame path: images/s, p50/p99 latency, stage times, peak memory")
    sp.add_argument("--model", type=Path, required=True, help="the bundle directory")
    sp.add_argument("--backend", default="onnxruntime-previous,onnxruntime,openvino",
                    help="comma list of backends (auto, torch, onnxruntime, onnxruntime-int8, openvino, openvino-bf16, "
                         "openvino-int8, onnxruntime-previous, torch-cuda, torch-fp16, tensorrt)")
    sp.add_argument("--reference", default="onnxruntime-previous",
                    help="ratios are to this backend's figures from the same round")
    sp.add_argument("--rounds", type=int, default=1, help="repeat the backends this many times, interleaved")
    sp.add_argument("--batch", default="1,8", help="comma list of frames per call")
    sp.add_argument("--iterations", type=int, default=20, help="timed calls per backend and batch size")
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--data", type=Path, default=None, help="a folder of images (searched recursively)")
    sp.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


# Each command imports what it needs when it runs: check-config (the unit's ExecStartPre) reads
# the configuration without loading torch.

def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    preflight(cfg, args.config, serving=cfg.agent.model is not None)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_calibrate(args: argparse.Namespace, cfg: Config) -> int:
    from calibration.calibrate import calibrate

    if args.method and args.method != cfg.model.method.kind:
        cfg.model.method = args.method  # another method: its default settings
    if args.tiled:
        cfg.model.tiling.enabled = True
    preflight(cfg, args.config)
    bundle = calibrate(args.data, args.out, cfg.model, progress=sys.stderr.isatty())
    m = bundle.manifest
    print(json.dumps({"bundle": str(bundle.path), "model_id": m.model_id, "method": m.method,
                      "threshold": m.decision.image_threshold, "pixel_threshold": m.decision.pixel_threshold,
                      "fit": m.score_stats.get("fit")}))
    return 0


def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from calibration.evaluate import evaluate, write_outputs
    from engines.bundle import load_bundle
    from engines.pipeline import Pipeline
    from engines.runtimes import open_backend

    bundle = load_bundle(args.model)
    if args.backend:
        cfg.runtime.backend = args.backend
    backend, why = open_backend(bundle, cfg.runtime)
    log.info("%s", why)
    ev = evaluate(bundle, Pipeline(bundle, backend, cfg.runtime, use_mask=not args.no_mask), args.data,
                  progress=sys.stderr.isatty())
    summary = write_outputs(ev, bundle, backend.name, args.report)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    if args.report:
        log.info("report written to %s", args.report / "index.html")
    return 0


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from agent.service import command

    return command(args, cfg)


def cmd_predict(args: argparse.Namespace, cfg: Config) -> int:
    from agent.predict import command

    return command(args, cfg)


def cmd_build_engine(args: argparse.Namespace, cfg: Config) -> int:
    from engines.build import command

    return command(args, cfg)


def cmd_bench(args: argparse.Namespace, cfg: Config) -> int:
    from engines.bench import command

    return command(args, cfg)


def _version() -> str:
    try:
        return version("inspection-agent")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _print_table(summary: dict) -> None:
    cols = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "n_images")
    print(f"{'set':<12}" + "".join(f"{c:>13}" for c in cols))
    rows = [("overall", summary)] + list(summary["per_type"].items())
    mask = summary.get("mask")
    if mask:
        rows.append(("no mask", mask["without_mask"]))
    for name, m in rows:
        print(f"{name:<12}" + "".join(f"{_fmt(m.get(c)):>13}" for c in cols))
    if mask:
        print(f"mask {mask['kind']} (outside weight {mask['outside_weight']}): frames by how the part was found "
              f"{mask['outcomes']}")


def _fmt(v: object) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
