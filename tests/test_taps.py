"""model.taps: auto: candidate sets, the search scored as the bundle scores, the ranking in the
bundle and the report, and what the search cannot serve refused before any fitting."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.settings import ModelConfig
from conftest import small_model_config


def _auto_config(**overrides: object) -> ModelConfig:
    cfg = small_model_config(**overrides)
    cfg.taps = "auto"
    cfg.tap_search.defects = 12
    cfg.tap_search.max_taps = 2
    return cfg


def test_candidates_are_every_set_of_one_to_three_stages_from_the_minimum_stride():
    from calibration.taps import candidate_sets
    from engines.efficientnet_lite import EfficientNetLite0

    net = EfficientNetLite0()
    stages = [f"stage{i}" for i in range(1, 8)]
    sets = candidate_sets(net.tap_strides, stages, 3, 8)
    assert len(sets) == 5 + 10 + 10 and len(set(sets)) == len(sets)
    assert ("stage3", "stage4", "stage5") in sets and all("stage2" not in s for s in sets)
    assert len(candidate_sets(net.tap_strides, stages, 3, 4)) == 6 + 15 + 20


@pytest.fixture(scope="module")
def auto_bundle(sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from calibration.calibrate import calibrate

    return calibrate(sample_data, tmp_path_factory.mktemp("taps") / "auto", _auto_config(), progress=False)


def test_the_chosen_taps_and_the_whole_ranking_are_in_the_bundle(auto_bundle):
    search = auto_bundle.manifest.score_stats["tap_search"]
    ranking = search["ranking"]
    assert len(ranking) == 5 + 10                       # stage3..7, max_taps 2
    assert auto_bundle.manifest.model.taps == search["chosen"] == ranking[0]["taps"]
    keys = [(-c["pixel_aupr"], -c["image_auroc"]) for c in ranking]
    assert keys == sorted(keys)
    assert ranking[0]["pixel_aupr"] > ranking[-1]["pixel_aupr"]   # the candidates differ: a choice was made
    assert search["defects"] == 12 and search["held_out_good"] >= 2


def test_the_search_scores_the_winner_as_the_bundle_does(auto_bundle, sample_data: Path):
    """The search's pixel AUPR of the chosen taps is what the fitted bundle's own frame path gives
    on the same held-out good images and synthetic defects."""
    from calibration.calibrate import reference_pipeline, split_train
    from calibration.data import read_image, train_samples
    from calibration.defects import synthesize_defects
    from calibration.metrics import average_precision

    cfg = _auto_config()
    _, val = split_train([s.path for s in train_samples(sample_data)], cfg.holdout, cfg.seed)
    good = [read_image(p) for p in val]
    synthetic = synthesize_defects(good, cfg.tap_search.defects, np.random.default_rng(cfg.seed))
    pipeline = reference_pipeline(auto_bundle)
    side = (128, 128)
    maps, truth = [], []
    for img, mask in [(g, np.zeros(g.shape[:2], bool)) for g in good] + synthetic:
        maps.append(cv2.resize(pipeline.score_frame(img).map, side, interpolation=cv2.INTER_AREA))
        truth.append(cv2.resize(mask.astype(np.uint8), side, interpolation=cv2.INTER_AREA) > 0)
    aupr = average_precision(np.stack(maps).reshape(-1), np.stack(truth).reshape(-1))
    searched = auto_bundle.manifest.score_stats["tap_search"]["ranking"][0]["pixel_aupr"]
    assert aupr == pytest.approx(searched, abs=0.03)


def test_the_evaluate_report_shows_the_ranking(auto_bundle, sample_data: Path, tmp_path: Path):
    from calibration.calibrate import reference_pipeline
    from calibration.evaluate import evaluate, write_outputs

    ev = evaluate(auto_bundle, reference_pipeline(auto_bundle), sample_data, progress=False)
    write_outputs(ev, auto_bundle, "torch", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    chosen = " + ".join(auto_bundle.manifest.model.taps)
    assert "Taps chosen at calibration" in page and f"<b>{chosen}</b>" in page
    assert page.count("<tr><td>") >= 15 and (tmp_path / "report" / "taps.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["tap_search"]["chosen"] == \
        auto_bundle.manifest.model.taps


@pytest.mark.parametrize("change, message", [
    ({"method": {"kind": "spade"}}, "method 'spade' needs its taps given"),
    ({"tiling": {"enabled": True}}, "with tiling, give the taps"),
])
def test_what_the_search_cannot_serve_is_refused_before_fitting(change: dict, message: str, sample_data: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import calibration.calibrate as cal

    cfg = ModelConfig.model_validate({"taps": "auto", "input_size": [128, 128], **change})
    monkeypatch.setattr(cal, "train_samples", lambda data: pytest.fail("fitting started"))
    with pytest.raises(ValueError, match=message):
        cal.calibrate(sample_data, tmp_path / "b", cfg, progress=False)
    assert not (tmp_path / "b").exists()


def test_taps_auto_is_a_configuration_value_never_a_bundle_one():
    from pydantic import ValidationError

    from engines.model import ModelSpec

    assert ModelConfig.model_validate({"taps": "auto"}).taps == "auto"
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({"taps": "auto"})
    with pytest.raises(ValueError, match="taps: auto is resolved by calibration"):
        ModelConfig.model_validate({"taps": "auto"}).spec()


def test_a_bad_taps_value_names_the_key():
    from pydantic import ValidationError

    from agent.config import Config, describe

    with pytest.raises(ValidationError) as e:
        Config.model_validate({"model": {"taps": ["stage3", 4]}})
    assert describe(e.value, "f.yaml") == "f.yaml: model.taps[1]: expected a string, got 4"


def test_the_default_stays_unless_the_best_clearly_leads_it_on_both_measures():
    from calibration.metrics import average_precision
    from calibration.taps import Candidate, _weighted_ap, choose

    rng = np.random.default_rng(0)
    truth = rng.random((60, 32, 32)) < 0.05
    noise = lambda: rng.random(truth.shape).astype(np.float32)  # noqa: E731
    good, same, weak = noise() + truth * 1.0, noise() + truth * 1.0, noise() + truth * 0.2
    # Weighted AP with unit weights is the metrics module's AP; weight 2 counts an image twice.
    assert _weighted_ap(good, truth, np.ones((1, 60)))[0] == pytest.approx(
        average_precision(good.reshape(-1), truth.reshape(-1)), abs=1e-9)
    twice = np.zeros((1, 60))
    twice[0, :30] = 2
    assert _weighted_ap(good, truth, twice)[0] == pytest.approx(
        average_precision(good[:30].reshape(-1), truth[:30].reshape(-1)), abs=1e-9)
    taps, default_taps = ["stage4"], ["stage3", "stage4", "stage5"]
    best, default = Candidate(taps, 0.6, 0.9, 100, 1.0), Candidate(default_taps, 0.5, 0.9, 100, 1.0)

    def maps(best_maps: np.ndarray, default_maps: np.ndarray) -> dict:
        return {tuple(taps): best_maps, tuple(default_taps): default_maps}

    # A clear lead replaces the default; a tie (two equally good candidates) keeps it.
    chosen, lead = choose(best, default, maps(good, weak), truth, rng)
    assert chosen == taps and lead == 1.0
    chosen, lead = choose(best, default, maps(good, same), truth, rng)
    assert chosen == default_taps and lead < 0.9
    assert choose(best, None, {tuple(taps): good}, truth, rng) == (taps, None)   # the default no candidate
    # A steady lead under the margin (AP 0.60 against 0.58, 4 %) keeps the default; a large one (0.60
    # against 0.49) does not.
    fair, a_little_worse, worse = noise() + truth * 0.5, noise() + truth * 0.48, noise() + truth * 0.4
    chosen, lead = choose(best, default, maps(fair, a_little_worse), truth, rng)
    assert chosen == default_taps and lead < 0.9
    chosen, lead = choose(best, default, maps(fair, worse), truth, rng)
    assert chosen == taps and lead >= 0.9
    # The same clear lead on pixels, with fewer defective images ranked first: the default stays.
    trailing = Candidate(taps, 0.6, 0.85, 100, 1.0)
    chosen, lead = choose(trailing, default, maps(good, weak), truth, rng)
    assert chosen == default_taps and lead == 1.0


def test_the_report_says_why_the_default_stayed_or_went():
    from calibration.report import _lead_html

    search = {"default": ["stage3", "stage4", "stage5"], "confidence": 0.9, "margin": 0.05}
    assert "so it replaces them" in _lead_html({**search, "chosen": ["stage4"], "lead": 0.95})
    short = _lead_html({**search, "chosen": search["default"], "lead": 0.5})
    assert "by 5% in 50%" in short and "so the default stays" in short
    assert "trails them on image AUROC" in _lead_html({**search, "chosen": search["default"], "lead": 0.95})
    assert _lead_html({**search, "chosen": ["stage4"], "lead": None}) == ""
