"""Local tone curves (``model.local_tone_bins``): a value mapped by its surroundings' brightness."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dicom_node.engine import load_style_model, save_style_model, translate
from dicom_node.engine.generator import ResnetGenerator
from dicom_node.engine.model_file import StyleModel
from dicom_node.engine.tone_filter import ToneFilter, binned_uniform_curve, gaussian_blur, uniform_curve
from dicom_node.train.tone_fit import fit_tone_filter
from tests.style_data import affine_psnr, demo_domains


def field(seed: int, size: int = 192) -> np.ndarray:
    """A radiograph-like image in model space: large dark and bright regions with detail in both."""
    rng = np.random.default_rng(seed)
    img = torch.zeros(1, 1, size, size)
    for sigma, amp in ((32.0, 0.7), (4.0, 0.2), (1.0, 0.05)):
        noise = torch.from_numpy(rng.standard_normal((size, size)).astype(np.float32))[None, None]
        img += amp * gaussian_blur(noise, sigma) * sigma
    x = img[0, 0].numpy()
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo) * 2 - 1, -1, 1).astype(np.float32)


def equalised(x: np.ndarray) -> np.ndarray:
    """Some look that the local curves change the image for: a compressed neighbourhood mean."""
    low = gaussian_blur(torch.from_numpy(x)[None, None], 24.0)[0, 0].numpy()
    return (x - low + 0.5 * np.tanh(3.0 * low)).astype(np.float32)


def run(tf: ToneFilter, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tf(torch.from_numpy(x)[None, None])[0, 0].numpy()


def test_local_tone_curves_learn_a_demo_vendors_multiscale_equalisation_from_unpaired_domains(tmp_path, caplog):
    """The demo's multiscale pair (phantoms, MUSICA-like equalisation with a compressed low-pass,
    on a fixed window): fitted on disjoint phantoms of the two looks, the stage with local tone
    curves comes closer to the true look of held-out phantoms than the stage without them, after
    the best gain and offset, as bench/quality.py scores it (bench/local_tone.py: +0.5 to +3.5 dB
    on three data seeds at 512 px)."""
    a, b, pairs = demo_domains(tmp_path / "demo", "multiscale", count=12, test_count=3, size=256)
    scores = {}
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        for bins in (1, 8):
            tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=bins)
            scores[bins] = np.mean([affine_psnr(run(tf, x), y) for _, x, y in pairs])
    assert scores[8] > scores[1] + 2.0, scores  # measured +3.8 dB
    assert caplog.text.count("local tone curves not checked: no validation pairs") == 1  # bins 8 only
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):  # validation pairs confirm them: kept
        checked = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=8,
                                  pairs=[(x, y) for _, x, y in pairs])
    assert "local tone curves kept" in caplog.text
    assert np.mean([affine_psnr(run(checked, x), y) for _, x, y in pairs]) > scores[1] + 2.0


def test_local_tone_curves_that_validation_pairs_show_worse_are_left_out(caplog):
    """Pairs whose truth is the stage without local curves: any curve but the identity is worse
    on them, so the fit resets the curves and says why."""
    a, b = [field(s) for s in range(4)], [equalised(field(s)) for s in range(10, 14)]
    tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=8)
    tests = [field(s) for s in range(20, 22)]
    with torch.no_grad():
        pairs = [(x, tf.before_local_tone(torch.from_numpy(x)[None, None])[0, 0].numpy()) for x in tests]
        assert min(float(np.abs(run(tf, x) - y).mean()) for x, y in pairs) > 0.005  # the curves change them
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        checked = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=8, pairs=pairs)
    assert "local tone curves left out" in caplog.text
    for x, y in pairs:
        assert np.abs(run(checked, x) - y).max() < 1e-5
    # Left out, they are identity curves, which the stage skips (they would triple its time):
    # applied anyway they give the same values.
    assert tf.local_tone_changes() and not checked.local_tone_changes()
    assert checked.describe()["local_tone"]["identity"] is True
    with torch.no_grad():
        before = checked.before_local_tone(torch.from_numpy(tests[0])[None, None])
        assert torch.allclose(checked.local_tone(before), before, atol=1e-6)


def affine_psnr(out: np.ndarray, target: np.ndarray) -> float:
    design = np.stack([out.ravel(), np.ones(out.size)], 1).astype(np.float64)
    coef = np.linalg.lstsq(design, target.ravel().astype(np.float64), rcond=None)[0]
    return float(10 * np.log10(4.0 / np.mean((design @ coef - target.ravel()) ** 2)))


def test_local_tone_curves_are_the_identity_until_fitted_and_blend_between_the_bins():
    x = torch.from_numpy(field(1))[None, None]
    assert torch.allclose(ToneFilter(band_knots=9, local_bins=4)(x), x, atol=1e-6)
    assert not ToneFilter(band_knots=9, local_bins=4).local_tone_changes()
    values = torch.stack([torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 5) ** 3])
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    y = torch.linspace(-1.2, 1.2, 13)
    for m in (0, 1):  # at a bin's centre: that bin's own curve (flat beyond its ends)
        assert torch.allclose(binned_uniform_curve(y, lo, hi, values, torch.full_like(y, float(m))),
                              uniform_curve(y, lo, hi, values[m]))
    halfway = binned_uniform_curve(y, lo, hi, values, torch.full_like(y, 0.5))
    assert torch.allclose(halfway, (uniform_curve(y, lo, hi, values[0]) + uniform_curve(y, lo, hi, values[1])) / 2)
    for bad in ({"local_bins": 0}, {"local_bins": 65}, {"local_sigma": 0.0}):
        with pytest.raises(ValueError):
            ToneFilter(**bad)


def test_without_local_tone_curves_the_stage_and_its_file_entry_are_as_before():
    """Off (the default) there are no local buffers and no architecture key: models written
    before them load unchanged, and the output is the stage up to its output tone curve."""
    a, b = [field(s) for s in range(3)], [equalised(field(s)) for s in range(10, 13)]
    tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4)
    assert not any(k.startswith("local") for k in tf.state_dict()) and "local_bins" not in tf.architecture()
    x = torch.from_numpy(field(20))[None, None]
    with torch.no_grad():
        assert torch.equal(tf(x), tf.before_local_tone(x))


def test_local_tone_curves_round_trip_through_a_model_file_and_tile_seamlessly(tmp_path):
    from dicom_node.engine import new_style_model
    from dicom_node.engine.tiling import SEAMLESS_MAX_BOUND, SEAMLESS_MEAN_BOUND

    fitted = fit_tone_filter([field(s) for s in range(4)], [equalised(field(s)) for s in range(10, 14)],
                             band_curves=True, brightness_bins=4, local_bins=8)
    gen = ResnetGenerator(ngf=4, n_blocks=1, residual=True, tone_filter=fitted.architecture())
    gen.load_state_dict({**new_style_model(ngf=4, n_blocks=1, residual=True, seed=1).state_dict(),
                         **{f"tone_filter.{k}": v for k, v in fitted.state_dict().items()}})
    gen.eval()
    model = load_style_model(save_style_model(gen, tmp_path / "local.safetensors", name="local"))
    arch = model.metadata["architecture"]["tone_filter"]
    assert arch["local_bins"] == 8 and arch["local_sigma"] == fitted.local_sigma
    img = field(30, size=200)[:, :184]
    whole = translate(model, img, tile=0)
    assert np.array_equal(whole, translate(StyleModel(generator=gen, metadata={}), img, tile=0))
    assert np.abs(whole - img).mean() > 0.05
    diff = np.abs(translate(model, img, tile=64) - whole)
    assert diff.mean() < SEAMLESS_MEAN_BOUND * 2 / 100 and diff.max() < SEAMLESS_MAX_BOUND * 2 / 100
    assert model.generator.tone_filter is not None
    assert model.generator.tone_filter.describe()["local_tone"] == {"bins": 8, "sigma_px": fitted.local_sigma, "identity": False}


def test_flat_domains_leave_the_local_curves_at_the_identity():
    """Images without a spread of neighbourhoods (flat, or tiny) give bins with no pixels in them:
    those curves stay the identity instead of failing the run."""
    flat = [np.full((64, 64), 0.1 * i, np.float32) for i in range(3)]
    tf = fit_tone_filter(flat, flat, band_curves=True, brightness_bins=4, local_bins=8)
    tiny = [np.random.default_rng(i).random((5, 9)).astype(np.float32) for i in range(3)]
    for fitted in (tf, fit_tone_filter(tiny, tiny, band_curves=True, brightness_bins=4, local_bins=8)):
        with torch.no_grad():
            for shape in ((1, 1), (3, 7), (64, 64)):
                assert torch.isfinite(fitted(torch.rand(1, 1, *shape) * 2 - 1)).all()


def test_the_stage_before_the_local_curves_is_fitted_as_without_them():
    """The local curves are fitted last, on the finished stage before them: its tone curves and
    band curves are those of the same fit without local curves (the output tone curve's fit
    once read the unfitted local curves, which clip to [-1, 1], and came out otherwise)."""
    a, b = [field(s) for s in range(4)], [np.clip(1.6 * equalised(field(s)), -1, 1) for s in range(10, 14)]
    fits = [fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=bins) for bins in (1, 8)]
    with torch.no_grad():
        toned = fits[1].before_local_tone(torch.from_numpy(a[0])[None, None])
    for key, value in fits[0].state_dict().items():
        assert torch.equal(value, fits[1].state_dict()[key]), key
    assert torch.equal(toned, fits[0](torch.from_numpy(a[0])[None, None]))


def test_with_pairs_the_local_curves_go_through_the_quantiles_the_pairs_chose(monkeypatch):
    """With validation pairs the local curves match each neighbourhood's histogram through as
    many quantiles as the pairs chose for the tone curves (every one would bring back the
    content that a choice of fewer left out; bench/local_tone.py --with-pairs): through 2, each
    curve is a straight line; through every one, it bends with the histograms."""
    from dicom_node.train import tone_fit

    a, b = [field(s) for s in range(4)], [equalised(field(s)) for s in range(10, 14)]
    pairs = [(field(s), equalised(field(s))) for s in range(20, 22)]
    seen, real_fit = [], tone_fit._fit_local_tone

    def fit_and_keep(tf, *args):
        real_fit(tf, *args)
        seen.append(tf.local_curves.clone())

    monkeypatch.setattr(tone_fit, "_fit_local_tone", fit_and_keep)
    for chosen in (2, tone_fit.FULL_DETAIL):
        monkeypatch.setattr(tone_fit, "choose_tone_detail", lambda stages, pairs, q=chosen: q)
        fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=8, pairs=pairs)
    bends = [float((c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).abs().max()) for c in seen]
    assert len(bends) == 2 and bends[0] < 1e-5 and bends[1] > 1e-3, bends
