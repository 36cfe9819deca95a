"""Joint training transforms keep image, saliency and soft maps aligned, exactly where their params say;
``crop_to_image_grid`` maps crop pixels back onto the original image."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smaf.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, JointTrainTransform, color_jitter,
                                  crop_to_image_grid, normalize, random_crop_box, resize_image, resize_maps)

H0, W0 = 64, 96
SQUARE = (16, 40, 52, 84)          # rows [16, 40), cols [52, 84): off-centre, so a flip moves it
BRIGHT, DARK = 220, 30


def _square_inputs():
    """Image uint8 (H0, W0, 3) with a bright square on a dark background, saliency (H0, W0) and soft maps
    (2, H0, W0) with the same square in channel 1 (channel 0 is zero, to catch a channel mix-up)."""
    y0, y1, x0, x1 = SQUARE
    image = np.full((H0, W0, 3), DARK, np.uint8)
    image[y0:y1, x0:x1] = BRIGHT
    sal = np.zeros((H0, W0), np.float32)
    sal[y0:y1, x0:x1] = 1.0
    soft = np.zeros((2, H0, W0), np.float32)
    soft[1] = sal
    return image, sal, soft


def _denormalize(image_chw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`: float32 (3, H, W) -> float32 (H, W, 3) in 0..255."""
    return (image_chw.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255.0


def _expected_square(params: dict) -> tuple[float, float, float, float]:
    """Where the square lands on the crop canvas according to ``params``: continuous (top, bottom, left,
    right) in canvas pixel units."""
    y0, y1, x0, x1 = SQUARE
    h0, w0 = params["orig_size"]
    h, w = params["scaled_size"]
    top, bottom = y0 * h / h0, y1 * h / h0
    left, right = x0 * w / w0, x1 * w / w0
    if params["flip"]:
        left, right = w - right, w - left
    dy = params["cont_top"] - params["img_top"]
    dx = params["cont_left"] - params["img_left"]
    return top + dy, bottom + dy, left + dx, right + dx


def _region_masks(params: dict, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(surely inside, surely outside) the square on the canvas, leaving a ``margin`` px band around its
    edges where resampling blurs values."""
    c = params["crop"]
    top, bottom, left, right = _expected_square(params)
    centres = np.arange(c) + 0.5
    ys, xs = centres[:, None], centres[None, :]
    inside = (ys > top + margin) & (ys < bottom - margin) & (xs > left + margin) & (xs < right - margin)
    near = (ys > top - margin) & (ys < bottom + margin) & (xs > left - margin) & (xs < right + margin)
    return inside, ~near


def _valid_rect(params: dict) -> np.ndarray:
    c = params["crop"]
    valid = np.zeros((c, c), bool)
    valid[params["cont_top"]:params["cont_top"] + params["ch"], params["cont_left"]:params["cont_left"] + params["cw"]] = True
    return valid


def _reconstruct(params: dict, image: np.ndarray, sal: np.ndarray, soft: np.ndarray):
    """Apply the geometry recorded in ``params`` (no colour jitter) independently of the transform."""
    h, w = params["scaled_size"]
    img, s, m = resize_image(image, (h, w)), np.clip(resize_maps(sal, (h, w), cv2.INTER_CUBIC), 0, 1), resize_maps(soft, (h, w))
    if params["flip"]:
        img, s, m = img[:, ::-1], s[:, ::-1], m[:, :, ::-1]
    c, ct, cl, it, il, ch, cw = (params[k] for k in ("crop", "cont_top", "cont_left", "img_top", "img_left", "ch", "cw"))
    out_img = np.zeros((3, c, c), np.float32)
    out_img[:, ct:ct + ch, cl:cl + cw] = normalize(np.ascontiguousarray(img[it:it + ch, il:il + cw]))
    out_s = np.zeros((c, c), np.float32)
    out_s[ct:ct + ch, cl:cl + cw] = s[it:it + ch, il:il + cw]
    out_m = np.zeros((soft.shape[0], c, c), np.float32)
    out_m[:, ct:ct + ch, cl:cl + cw] = m[:, it:it + ch, il:il + cw]
    return out_img, out_s, out_m


# ------------------------------------------------------------------------------------- joint geometry
@pytest.mark.parametrize("jitter", [None, (0.3, 0.3, 0.3, 0.1)])
def test_square_lands_where_params_say(jitter):
    image, sal, soft = _square_inputs()
    crop = 96
    # long side 48..160 vs crop 96: some samples are smaller than the crop (padding), some larger (cropping)
    transform = JointTrainTransform(crop, resize_long=(48, 160), flip=True, jitter=jitter)
    seen = {"flip": set(), "padded": False, "cropped": False}
    for seed in range(40):
        out = transform(np.random.default_rng(seed), image, saliency=sal, soft=soft)
        p = out["params"]
        h, w = p["scaled_size"]
        assert p["orig_size"] == (H0, W0) and p["crop"] == crop
        assert (h, w) == (round(H0 * p["scale"]), round(W0 * p["scale"])) and 48 <= max(h, w) <= 160
        assert (p["ch"], p["cw"]) == (min(crop, h), min(crop, w))
        assert out["image"].shape == (3, crop, crop) and out["image"].dtype == np.float32
        assert out["saliency"].shape == (crop, crop) and out["soft"].shape == (2, crop, crop)
        valid = _valid_rect(p)
        np.testing.assert_array_equal(out["valid"], valid.astype(np.float32))
        # padding is exactly zero in every output
        assert not out["image"][:, ~valid].any() and not out["saliency"][~valid].any() and not out["soft"][:, ~valid].any()

        inside, outside = _region_masks(p, margin=2.0)
        inside &= valid
        outside &= valid
        assert inside.sum() > 20, "the square should stay partly visible in these crops"  # makes the test bite
        grey = _denormalize(out["image"]).mean(2)
        assert grey[inside].min() > grey[outside].max() + 40, f"seed {seed}: image square misplaced"
        assert out["saliency"][inside].min() > 0.9 and out["saliency"][outside].max() < 0.1, f"seed {seed}"
        assert out["soft"][1][inside].min() > 0.9 and out["soft"][1][outside].max() < 0.1, f"seed {seed}"
        assert not out["soft"][0].any()
        seen["flip"].add(p["flip"])
        seen["padded"] |= h < crop or w < crop
        seen["cropped"] |= h > crop or w > crop
    assert seen["flip"] == {True, False} and seen["padded"] and seen["cropped"]


def test_square_lands_where_params_say_without_resize():
    image, sal, soft = _square_inputs()
    transform = JointTrainTransform(80, resize_long=None, flip=True)
    for seed in range(10):
        out = transform(np.random.default_rng(seed), image, saliency=sal, soft=soft)
        p = out["params"]
        assert p["scale"] == 1.0 and p["scaled_size"] == (H0, W0)
        inside, outside = _region_masks(p, margin=0.0)   # no resampling: the edges are exact
        valid = _valid_rect(p)
        np.testing.assert_array_equal(out["saliency"] > 0.5, inside & valid)
        np.testing.assert_array_equal(out["soft"][1] > 0.5, inside & valid)
        assert not (outside & valid & (out["saliency"] > 0)).any()


def test_jitter_changes_the_image_only():
    image, sal, soft = _square_inputs()
    image = image.copy()
    image[..., 0] //= 2                      # a coloured square, so hue and saturation jitter act too
    for jitter in (None, (0.3, 0.3, 0.3, 0.1)):
        transform = JointTrainTransform(72, resize_long=(60, 120), flip=True, jitter=jitter)
        for seed in range(8):
            out = transform(np.random.default_rng(seed), image, saliency=sal, soft=soft)
            ref_img, ref_sal, ref_soft = _reconstruct(out["params"], image, sal, soft)
            np.testing.assert_array_equal(out["saliency"], ref_sal)
            np.testing.assert_array_equal(out["soft"], ref_soft)
            valid = out["valid"] > 0
            if jitter is None:
                np.testing.assert_array_equal(out["image"], ref_img)
            else:
                assert np.abs(out["image"] - ref_img)[:, valid].max() > 0.05
                assert not out["image"][:, ~valid].any()


def test_same_rng_seed_gives_same_sample():
    image, sal, soft = _square_inputs()
    transform = JointTrainTransform(64, resize_long=(48, 128), flip=True, jitter=(0.3, 0.3, 0.3, 0.1))
    a = transform(np.random.default_rng(5), image, saliency=sal, soft=soft)
    b = transform(np.random.default_rng(5), image, saliency=sal, soft=soft)
    assert a["params"] == b["params"]
    for key in ("image", "valid", "saliency", "soft"):
        np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------------- crop -> image grid
def _smooth_soft_maps() -> np.ndarray:
    """Two smooth maps (2, H0, W0): a Gaussian bump (steep enough that half a pixel of misalignment shows)
    and a ramp (non-zero up to the image border)."""
    yy, xx = np.mgrid[0:H0, 0:W0].astype(np.float32)
    bump = np.exp(-(((yy - 24) / 10) ** 2 + ((xx - 64) / 14) ** 2))
    ramp = xx / W0 * 0.5 + yy / H0 * 0.5
    return np.stack([bump, ramp]).astype(np.float32)


def _grid_vs_transform_error(soft, transform, seed, out_size, shift_x=0.0):
    """Max |grid_sample(original soft, grid) - bilinear downsample of the transform's soft output| over the
    output cells that lie wholly on image pixels. ``shift_x`` moves the grid by that many original pixels."""
    out = transform(np.random.default_rng(seed), np.zeros((H0, W0, 3), np.uint8), soft=soft)
    grid = crop_to_image_grid(out["params"], out_size).copy()
    grid[..., 0] += shift_x * 2 / W0
    sampled = F.grid_sample(torch.from_numpy(soft)[None], torch.from_numpy(grid)[None], mode="bilinear",
                            padding_mode="border", align_corners=False)[0].numpy()
    # bilinear downsampling by an integer factor samples the crop at the same cell centres as the grid
    down = F.interpolate(torch.from_numpy(out["soft"])[None], size=(out_size, out_size), mode="bilinear",
                         align_corners=False)[0].numpy()
    stride = out["soft"].shape[-1] // out_size
    valid_frac = F.avg_pool2d(torch.from_numpy(out["valid"])[None, None], stride)[0, 0].numpy()
    on_image = valid_frac == 1.0
    return float(np.abs(sampled[:, on_image] - down[:, on_image]).max()), out, grid, valid_frac


def test_crop_to_image_grid_samples_the_transformed_soft_maps():
    soft = _smooth_soft_maps()
    crop, out_size = 96, 24
    transform = JointTrainTransform(crop, resize_long=(48, 160), flip=True)
    worst_shifted = 0.0
    for seed in range(30):
        error, out, grid, valid_frac = _grid_vs_transform_error(soft, transform, seed, out_size)
        assert grid.shape == (out_size, out_size, 2) and grid.dtype == np.float32
        assert error < 0.02, f"seed {seed}: grid and transform disagree by {error:.3f} ({out['params']})"
        # grid points of cells wholly on the image fall inside [-1, 1], of cells wholly on padding outside
        inside_grid = (np.abs(grid) <= 1.0).all(-1)
        assert inside_grid[valid_frac == 1.0].all() and not inside_grid[valid_frac == 0.0].any()
        worst_shifted = max(worst_shifted, _grid_vs_transform_error(soft, transform, seed, out_size, 0.5)[0])
    # the comparison is sharp enough to notice a grid off by half an original pixel
    assert worst_shifted > 0.02


def test_crop_to_image_grid_identity_without_resize_or_flip():
    """No resize, no flip, crop = image: the grid is the pixel-centre grid of the image itself."""
    params = {"crop": 8, "orig_size": (8, 8), "scaled_size": (8, 8), "flip": False, "cont_top": 0,
              "cont_left": 0, "img_top": 0, "img_left": 0}
    grid = crop_to_image_grid(params, 8)
    centres = (np.arange(8) + 0.5) / 8 * 2 - 1
    np.testing.assert_allclose(grid[..., 0], np.broadcast_to(centres[None, :], (8, 8)), atol=1e-6)
    np.testing.assert_allclose(grid[..., 1], np.broadcast_to(centres[:, None], (8, 8)), atol=1e-6)
    flipped = crop_to_image_grid({**params, "flip": True}, 8)
    np.testing.assert_allclose(flipped[..., 0], -grid[..., 0], atol=1e-6)


# ------------------------------------------------------------------------------------------- basics
def test_normalize():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (255, 255, 255)
    x = normalize(image)
    assert x.shape == (3, 2, 3) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[:, 0, 0], (1 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6)
    np.testing.assert_allclose(x[:, 1, 2], -IMAGENET_MEAN / IMAGENET_STD, rtol=1e-6)


def test_resize_image_and_maps():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    assert resize_image(image, (10, 20)) is image
    big = resize_image(image, (15, 7))
    assert big.shape == (15, 7, 3) and big.dtype == np.uint8        # size is (H, W); bicubic saturates to uint8
    maps = rng.random((3, 10, 20)).astype(np.float32)
    assert resize_maps(maps, (5, 8)).shape == (3, 5, 8)
    assert resize_maps(maps[0], (5, 8)).shape == (5, 8)
    assert resize_maps(maps, (10, 20)) is maps
    # more channels than cv2 takes at once: resized in chunks, each channel as if alone
    many = rng.random((600, 6, 5)).astype(np.float32)
    res = resize_maps(many, (4, 9))
    assert res.shape == (600, 4, 9)
    for c in (0, 127, 128, 255, 256, 599):
        np.testing.assert_allclose(res[c], resize_maps(many[c], (4, 9)), atol=1e-6)
    single = resize_maps(many[:1], (4, 9))                         # cv2 drops a size-1 channel axis
    assert single.shape == (1, 4, 9)


def test_random_crop_box():
    rng = np.random.default_rng(0)
    for h, w, crop in [(50, 80, 64), (100, 120, 64), (30, 20, 64), (64, 64, 64)]:
        for _ in range(20):
            ct, cl, it, il, ch, cw = random_crop_box(rng, h, w, crop)
            assert (ch, cw) == (min(crop, h), min(crop, w))
            assert 0 <= ct and ct + ch <= crop and 0 <= cl and cl + cw <= crop
            assert 0 <= it and it + ch <= h and 0 <= il and il + cw <= w
            assert (ct == 0 or it == 0) and (cl == 0 or il == 0)


def test_color_jitter_off_is_identity_and_on_keeps_dtype():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(color_jitter(image, rng, 0, 0, 0, 0), image)
    out = color_jitter(image, rng, 0.4, 0.4, 0.4, 0.1)
    assert out.shape == image.shape and out.dtype == np.uint8 and (out != image).any()
