"""Pixel signals on real photos: sharpness and noise separate clean from degraded images, and the change
measure tells an applied edit (and where it happened) from a re-encoded copy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flywheel.config import JudgeConfig
from flywheel.signals.change import centre_prior, measure_change, person_mask
from flywheel.signals.quality import measure_quality, sharpness

DEFAULTS = JudgeConfig()


def test_default_limits_pass_clean_photos_and_fail_blur_and_noise(planted):
    from skimage import data

    for clean in (planted["source"], planted["good"], Image.fromarray(data.coffee())):
        q = measure_quality(clean)
        assert q.sharpness >= DEFAULTS.min_sharpness and q.noise_sigma <= DEFAULTS.max_noise_sigma
    blurred, noisy = measure_quality(planted["blurred"]), measure_quality(planted["noisy"])
    assert blurred.sharpness < DEFAULTS.min_sharpness / 10
    assert noisy.noise_sigma > 2 * DEFAULTS.max_noise_sigma
    # Noise also raises the Laplacian variance: why the judge checks noise on its own.
    assert noisy.sharpness > measure_quality(planted["good"]).sharpness


def test_sharpness_is_measured_at_one_scale(planted):
    """The same photo at 2x the pixels scores about the same (raw Laplacian variance would drop ~4x), so
    one threshold serves 512 px edits and 1024 px generations; blur is caught at either size."""
    src = planted["source"]
    big = src.resize((1024, 1024), Image.Resampling.LANCZOS)
    normalised = measure_quality(big).sharpness / measure_quality(src).sharpness
    def gray(im):
        return np.asarray(im.convert("L"), np.float32) / 255

    raw = sharpness(gray(big)) / sharpness(gray(src))
    assert 0.6 < normalised < 1.4 and raw < 0.3
    big_blurred = planted["blurred"].resize((1024, 1024), Image.Resampling.LANCZOS)
    assert measure_quality(big_blurred).sharpness < DEFAULTS.min_sharpness


def test_exposure_fractions():
    q = measure_quality(Image.new("RGB", (300, 200), (0, 0, 0)))
    assert q.dark_fraction == 1.0 and q.bright_fraction == 0.0 and q.sharpness == 0.0


def test_change_tells_an_edit_from_a_copy(planted):
    src = planted["source"]
    assert measure_change(src, src).changed_fraction == 0.0
    copy = measure_change(src, planted["copy"])  # JPEG re-encode: nothing a viewer would call an edit
    assert copy.changed_fraction < 0.005 and copy.mean_abs_diff < 0.01
    edit = measure_change(src, planted["good"])
    assert edit.changed_fraction > 5 * DEFAULTS.min_changed_fraction
    # The edit recoloured the background and kept the person: the person mask sees that.
    assert edit.mask == "mediapipe_selfie"
    assert edit.background_changed_fraction > 0.7 and edit.subject_changed_fraction < 0.35
    resized = measure_change(src, src.resize((300, 300), Image.Resampling.LANCZOS))
    assert resized.size_changed and resized.changed_fraction < 0.01


def test_person_mask_falls_back_to_a_centre_prior_without_a_person():
    flat = Image.new("RGB", (200, 100), (120, 120, 120))
    mask, how = person_mask(flat, flat.size)
    assert how == "centre_prior" and mask.shape == (100, 200)
    assert mask[50, 100] and not mask[0, 0] and 0.3 < mask.mean() < 0.6


def test_change_without_segmentation_uses_the_centre_prior(planted):
    m = measure_change(planted["source"], planted["good"], use_segmentation=False)
    assert m.mask == "centre_prior"
    expected = centre_prior(256, 256).mean()
    assert m.subject_area == pytest.approx(float(expected))
    assert np.isfinite(m.background_changed_fraction)
