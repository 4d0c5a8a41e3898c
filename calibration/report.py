"""The evaluation report a person looks at: curves, heatmap examples, metrics table.

write_report() fills a folder with roc.png (image level), pr.png (pixel level),
heatmaps.png (the worst misses, the top anomalies, the highest-scoring and typical normal
images), metrics.json and index.html that ties them together.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure  # without pyplot: draws with Agg, no global backend state

from calibration.metrics import MetricSet, precision_recall_curve, roc_curve

_CURVE_POINTS = 2000  # a plotted pixel curve needs no more; the data has millions
_PER_GROUP = 6  # heatmap examples per group, four groups
_TILE_SIDE = 256  # longer side of one heatmap tile in pixels
_CAPTION_HEIGHT = 52  # three lines of text
_CAPTION_CHARS = 40  # what fits on one line of a tile
_CONTOUR_BGR = (0, 255, 0)
_METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max")


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    image_scores: np.ndarray,
    labels: np.ndarray,
    score_maps: np.ndarray,
    masks: np.ndarray,
    images: list[np.ndarray],
    names: list[str],
    threshold: float | None,
    title: str,
    mask: dict[str, Any] | None = None,
    tap_search: dict[str, Any] | None = None,
) -> Path:
    """Write the report into `out_dir` (created if absent) and return its index.html.

    `metrics` is what compute_metrics returns; `images` are uint8 grey or BGR at the
    score-map size, one per score, named by `names`. `mask`: how the object mask found the part
    and the metrics without it (calibration/evaluate.py); `tap_search`: the bundle's ranking of
    candidate taps (calibration/taps.py), as a table and taps.png.
    """
    scores = np.asarray(image_scores, np.float64)
    labels = np.asarray(labels).astype(int)
    masks = np.asarray(masks) > 0
    _check_inputs(scores, labels, score_maps, masks, images, names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    overall = metrics["overall"]
    _plot_roc(out_dir / "roc.png", scores, labels, threshold, overall.image_auroc, title)
    _plot_pixel_pr(out_dir / "pr.png", score_maps, masks, overall.pixel_aupr, title)
    _write_heatmaps(
        out_dir / "heatmaps.png", scores, labels, score_maps, masks, images, names, threshold
    )
    record = {
        "title": title,
        "threshold": None if threshold is None else float(threshold),
        "overall": overall.to_dict(),
        "per_type": {name: m.to_dict() for name, m in metrics["per_type"].items()},
        "images": [
            {"name": name, "label": int(label), "score": float(score)}
            for name, label, score in zip(names, labels, scores)
        ],
    }
    if tap_search is not None:
        _plot_taps(out_dir / "taps.png", tap_search, title)
    record.update({"mask": mask, "tap_search": tap_search})
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    index = out_dir / "index.html"
    index.write_text(_html(title, metrics, scores, labels, threshold, mask, tap_search))
    return index


def _plot_taps(path: Path, search: dict[str, Any], title: str) -> None:
    """Pixel AUPR (bars) and image AUROC (dots) of every candidate tap set, best first."""
    ranking = search["ranking"]
    names = [" + ".join(c["taps"]) for c in ranking]
    fig = Figure(figsize=(max(6.0, 0.22 * len(ranking) + 2), 5), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(len(ranking))
    ax.bar(x, [c["pixel_aupr"] for c in ranking], color=["tab:red" if c["taps"] == search["chosen"] else "tab:blue"
                                                          for c in ranking], label="pixel AUPR")
    ax2 = ax.twinx()
    ax2.plot(x, [c["image_auroc"] for c in ranking], "k.", label="image AUROC")
    ax2.set_ylabel("image AUROC (dots)")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set(ylabel="pixel AUPR (bars; chosen in red)",
           title=f"{title}: taps on {search['held_out_good']} held-out good + {search['defects']} synthetic defects")
    fig.tight_layout()
    fig.savefig(path)


def _plot_roc(
    path: Path,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
    auroc: float | None,
    title: str,
) -> None:
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.8", linestyle="--", linewidth=1)
    if labels.min() == labels.max():
        ax.text(0.5, 0.5, "ROC undefined: one class only", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"image ROC, AUROC {auroc:.4f}")
        if threshold is not None:
            ng = scores >= threshold
            point = (ng[labels == 0].mean(), ng[labels == 1].mean())
            ax.plot(*point, "o", color="red", label=f"threshold {threshold:.4g}")
        ax.legend(loc="lower right")
    ax.set(
        xlabel="false positive rate (good parts rejected)",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"{title}: image-level ROC",
    )
    fig.tight_layout()
    fig.savefig(path)


def _plot_pixel_pr(
    path: Path, score_maps: np.ndarray, masks: np.ndarray, aupr: float | None, title: str
) -> None:
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    if not masks.any():
        ax.text(0.5, 0.5, "PR undefined: no defect pixels", ha="center", va="center")
    else:
        precision, recall, _ = precision_recall_curve(
            np.asarray(score_maps).reshape(-1), masks.reshape(-1)
        )
        shown = np.unique(np.linspace(0, recall.size - 1, _CURVE_POINTS).astype(int))
        ax.plot(recall[shown], precision[shown], label=f"pixel PR, AP {aupr:.4f}")
        ax.axhline(masks.mean(), color="0.8", linestyle="--", linewidth=1, label="chance")
        ax.legend(loc="upper right")
    ax.set(
        xlabel="recall (defect pixels found)",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"{title}: pixel-level PR",
    )
    fig.tight_layout()
    fig.savefig(path)


def _write_heatmaps(
    path: Path,
    scores: np.ndarray,
    labels: np.ndarray,
    score_maps: np.ndarray,
    masks: np.ndarray,
    images: list[np.ndarray],
    names: list[str],
    threshold: float | None,
) -> None:
    chosen = _pick_examples(scores, labels)
    # One colour scale for every tile, so equal colours mean equal scores.
    sample = np.asarray(score_maps)[:, ::4, ::4]
    low, high = np.percentile(sample, [1, 99.9])
    tiles = [
        _tile(
            images[i], score_maps[i], masks[i], low, high,
            _caption(group, names[i], scores[i], labels[i], threshold),
        )
        for group, i in chosen
    ]
    columns = _PER_GROUP
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)]
    if not cv2.imwrite(str(path), np.vstack(rows)):
        raise OSError(f"could not write {path}")


def _pick_examples(scores: np.ndarray, labels: np.ndarray) -> list[tuple[str, int]]:
    """(group, index) for the lowest-scoring defects (the worst misses), the highest-scoring
    defects, the highest-scoring good images (likely false rejects) and good images around
    the median; no image twice."""
    anomalous = np.flatnonzero(labels == 1)
    good = np.flatnonzero(labels == 0)
    by_score_anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")]
    by_score_good = good[np.argsort(scores[good], kind="stable")]
    middle = max(0, by_score_good.size // 2 - _PER_GROUP // 2)
    groups = [
        ("lowest defect", by_score_anomalous[:_PER_GROUP]),
        ("highest defect", by_score_anomalous[::-1][:_PER_GROUP]),
        ("highest good", by_score_good[::-1][:_PER_GROUP]),
        ("typical good", by_score_good[middle:middle + _PER_GROUP]),
    ]
    seen: set[int] = set()
    chosen = []
    for group, indices in groups:
        for i in indices:
            if int(i) not in seen:
                seen.add(int(i))
                chosen.append((group, int(i)))
    return chosen


def _tile(
    image: np.ndarray, score_map: np.ndarray, mask: np.ndarray, low: float, high: float, caption: str
) -> np.ndarray:
    h, w = score_map.shape
    scale = _TILE_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    bgr = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    spread = max(high - low, 1e-12)
    level = np.clip((score_map - low) / spread * 255, 0, 255).astype(np.uint8)
    level = cv2.resize(level, size, interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(level, cv2.COLORMAP_JET)
    tile = cv2.addWeighted(bgr, 0.5, heat, 0.5, 0)
    small_mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tile, contours, -1, _CONTOUR_BGR, 2)
    strip = np.full((_CAPTION_HEIGHT, size[0], 3), 255, np.uint8)
    for line, text in enumerate(caption.split("\n")):
        if len(text) > _CAPTION_CHARS:  # keep the end of a long name: the file name
            text = "..." + text[3 - _CAPTION_CHARS:]
        cv2.putText(strip, text, (4, 14 + 16 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([tile, strip])


def _caption(group: str, name: str, score: float, label: int, threshold: float | None) -> str:
    truth = "defect" if label else "good"
    verdict = "" if threshold is None else (" NG" if score >= threshold else " OK")
    return f"{group}\n{name}\nscore {score:.4g}{verdict} ({truth})"


def _html(
    title: str,
    metrics: dict[str, Any],
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
    mask: dict[str, Any] | None = None,
    tap_search: dict[str, Any] | None = None,
) -> str:
    rows = [_html_row("overall", metrics["overall"])]
    if mask is not None:
        rows.append(_html_row("without the mask", MetricSet(**mask["without_mask"])))
    rows += [_html_row(name, m) for name, m in metrics["per_type"].items()]
    header = "".join(f"<th>{c}</th>" for c in ("set", "images", "anomalous", *_METRIC_COLUMNS))
    if threshold is None:
        operating = "<p>No threshold given.</p>"
    else:
        ng = scores >= threshold
        rejected, n_good = int(ng[labels == 0].sum()), int((labels == 0).sum())
        missed, n_defect = int((~ng[labels == 1]).sum()), int((labels == 1).sum())
        operating = (
            f"<p>Threshold {threshold:.6g}: {rejected} of {n_good} good images rejected, "
            f"{missed} of {n_defect} defective images missed.</p>"
        )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} img{{max-width:100%}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{operating}
<table><tr>{header}</tr>
{chr(10).join(rows)}
</table>
<p>AUPRO is the area under the per-region overlap curve up to the false positive limit
(0.3 unless chosen otherwise), normalised to 1. Per-type sets hold the good images plus that
type's images. Raw numbers: <a href="metrics.json">metrics.json</a>.</p>
{_mask_html(mask)}
<img src="roc.png" alt="image-level ROC"> <img src="pr.png" alt="pixel-level PR">
{_taps_html(tap_search)}
<h2>Examples</h2>
<p>Heatmap over the image, true defect outline in green.</p>
<img src="heatmaps.png" alt="heatmap examples">
</body></html>
"""


def _mask_html(mask: dict[str, Any] | None) -> str:
    if mask is None:
        return ""
    found = ", ".join(f"{how}: {n}" for how, n in sorted(mask["outcomes"].items())) or "none"
    return (f"<p>Object mask <b>{html.escape(mask['kind'])}</b>, outside weight {mask['outside_weight']}; frames by "
            f"how the part was found: {html.escape(found)}. The row <i>without the mask</i> is the same run's "
            "maps before the mask.</p>")


def _taps_html(search: dict[str, Any] | None) -> str:
    if search is None:
        return ""
    rows = "\n".join(f"<tr><td>{i + 1}</td><td>{html.escape(' + '.join(c['taps']))}</td><td>{c['channels']}</td>"
                     f"<td>{c['pixel_aupr']:.4f}</td><td>{c['image_auroc']:.4f}</td></tr>"
                     for i, c in enumerate(search["ranking"]))
    return (f"<h2>Taps chosen at calibration</h2><p>model.taps: auto chose <b>{html.escape(' + '.join(search['chosen']))}"
            f"</b>: candidates ranked by pixel AUPR (image AUROC breaks ties) on {search['held_out_good']} held-out "
            f"good images plus {search['defects']} synthetic defects, never on the test set "
            f"({search['seconds']:.0f} s).{_lead_html(search)}</p><img src=\"taps.png\" alt=\"tap ranking\">"
            f"<table><tr><th>rank</th><th>taps</th><th>channels</th><th>pixel AUPR</th><th>image AUROC</th></tr>"
            f"\n{rows}\n</table>")


def _lead_html(search: dict[str, Any]) -> str:
    if search.get("lead") is None:
        return ""
    margin = f" by {100 * search['margin']:.0f}%" if search.get("margin") else ""
    if search["chosen"] != search["default"]:
        verdict = "so it replaces them"
    elif search["lead"] >= search["confidence"]:
        verdict = "but it trails them on image AUROC, so the default stays"
    else:
        verdict = "so the default stays"
    return (f" The first of the ranking led the default taps ({html.escape(' + '.join(search['default']))}){margin} in "
            f"{100 * search['lead']:.0f}% of paired bootstrap resamples (it must in {100 * search['confidence']:.0f}%),"
            f" {verdict}.")


def _html_row(name: str, m: MetricSet) -> str:
    values = [getattr(m, column) for column in _METRIC_COLUMNS]
    cells = "".join("<td>-</td>" if v is None else f"<td>{v:.4f}</td>" for v in values)
    counts = f"<td>{m.n_images}</td><td>{m.n_anomalous}</td>"
    return f"<tr><td>{html.escape(name)}</td>{counts}{cells}</tr>"


def _check_inputs(
    scores: np.ndarray,
    labels: np.ndarray,
    score_maps: np.ndarray,
    masks: np.ndarray,
    images: list[np.ndarray],
    names: list[str],
) -> None:
    n = scores.shape[0]
    if np.shape(score_maps) != masks.shape or masks.ndim != 3:
        raise ValueError(
            f"score_maps and masks must be (N, H, W) alike, got {np.shape(score_maps)} "
            f"and {masks.shape}"
        )
    sizes = {
        "labels": labels.shape[0],
        "score_maps": masks.shape[0],
        "images": len(images),
        "names": len(names),
    }
    wrong = {key: size for key, size in sizes.items() if size != n}
    if wrong:
        raise ValueError(f"report inputs must hold one entry per image score ({n}), got {wrong}")
    if n == 0:
        raise ValueError("report needs at least one image")
    map_size = masks.shape[1:]
    for name, image in zip(names, images):
        grey_or_bgr = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        if image.dtype != np.uint8 or image.shape[:2] != map_size or not grey_or_bgr:
            raise ValueError(
                f"image {name!r}: expected uint8 grey or BGR of size {map_size}, "
                f"got {image.dtype} {image.shape}"
            )
