"""A2GNN seeds: the confident-seed rule on a constructed CAM, padding with 255, box files, VOC XML and tight
boxes from masks."""
from __future__ import annotations

import numpy as np
import pytest

from smaf.refine.a2gnn_boxes import (Box, box_seeds, boxes_from_mask, grabcut_box_seeds, read_box_file, read_boxes,
                                     read_voc_xml, write_box_file)
from smaf.refine.a2gnn_seeds import SeedParams, SeedRefiner, confident_seeds, pad_seeds

# Columns of a 4 x 10 CAM (every row the same) for classes 1 and 3.
M1 = [0, 0, 0.2, 0.5, 0.9, 1.0, 0.3, 0, 0, 0]
M3 = [0, 0, 0, 0, 0.1, 0.2, 0.6, 0.8, 0.005, 0]
# Derived by hand, column by column (no CRF: marginals = scores / their sum; la bg (1-max)^4, ha bg (1-max)^24):
#  0, 1  max 0: la and ha say background, (1-0)^24 = 1 > 0.8, confidence 1                      -> 0
#  2     la bg 0.8^4 = 0.41 > 0.2: la background -> 255 (ha: class 1, not background)          -> 255
#  3     la: class 1 (q 0.5/0.5625 = 0.89); class-1 region = columns 0-5 (argmax), its values > 0.01 are
#        {0.2, 0.5, 0.9, 1.0} x 4, 60th percentile 0.9; 0.5 < 0.9                                 -> 255
#  4, 5  class 1, M >= 0.9, confidence 0.9 / 0.83                                                 -> 2
#  6     la: class 3 but q = 0.6 / 0.93 = 0.65 < 0.8                                               -> 255
#  7     class 3 (q 0.998); class-3 region values > 0.01 {0.6, 0.8} x 4, 60th percentile 0.8     -> 4
#  8     max 0.005: la / ha background, (0.995)^24 = 0.89 > 0.8, confidence 0.99                  -> 0
#  9     -> 0
EXPECTED = [0, 0, 255, 255, 2, 2, 255, 4, 0, 0]


def _constructed():
    image = np.zeros((4, 10, 3), np.uint8)
    cams = {1: np.tile(np.float32(M1), (4, 1)), 3: np.tile(np.float32(M3), (4, 1))}
    return image, cams


def test_the_seed_rule_gives_the_hand_derived_seed_map():
    image, cams = _constructed()
    seeds = confident_seeds(image, cams, SeedParams(crf=False))
    assert seeds.dtype == np.uint8 and seeds.shape == (4, 10)
    np.testing.assert_array_equal(seeds, np.tile(np.uint8(EXPECTED), (4, 1)))
    # each constant of the rule matters: the whole region and a lower confidence bar keep column 6, a looser top
    # fraction column 3
    loose = confident_seeds(image, cams, SeedParams(crf=False, min_confidence=0.6, top_fraction=1.0))
    assert loose[0, 6] == 4
    wider = confident_seeds(image, cams, SeedParams(crf=False, top_fraction=0.8))
    assert wider[0, 3] == 2
    assert (confident_seeds(image, {}, SeedParams(crf=False)) == 0).all()
    with pytest.raises(ValueError, match="image size"):
        confident_seeds(image, {1: np.zeros((2, 2), np.float32)})


def test_the_seed_rule_with_the_crf_keeps_clean_regions():
    image = np.full((48, 64, 3), 60, np.uint8)
    image[8:40, 8:32] = 200
    cam = np.zeros((48, 64), np.float32)
    cam[8:40, 8:32] = np.linspace(0.5, 1.0, 24, dtype=np.float32)[None]
    seeds = SeedRefiner(SeedParams())(image, {0: cam}, [0])
    assert set(np.unique(seeds)) <= {0, 1, 255}
    assert (seeds[8:40, 24:32] == 1).mean() > 0.9                   # the top of the region
    assert (seeds[8:40, 8:14] == 1).sum() == 0                      # not its weak part
    assert (seeds[:, 44:] == 0).mean() > 0.9                        # far background


def test_shifting_by_the_background_rule_gives_seeds_to_maps_with_a_floor():
    """A self-trained map never reaches 0 (here a floor of 0.05): the spec's rule ((1 - max M)^24 > 0.8, i.e.
    max M < 0.0093) then finds no background seed at all; shifted by the image's background score (fixed 0.2:
    clip((M - 0.2) / 0.8)) the far background is seeded again and the object keeps its top seeds; maps whose
    background is 0 already keep their seeds under the shift; the config key is checked."""
    from smaf.cam.background import BackgroundRule
    from smaf.config import ConfigError, load_config

    image = np.full((48, 64, 3), 60, np.uint8)
    image[8:40, 8:32] = 200
    cam = np.full((48, 64), 0.05, np.float32)
    cam[8:40, 8:32] = np.linspace(0.5, 1.0, 24, dtype=np.float32)[None]
    plain = confident_seeds(image, {0: cam}, SeedParams())
    assert (plain == 0).sum() == 0
    shifted = confident_seeds(image, {0: cam}, SeedParams(shift=BackgroundRule("fixed", 0.2)))
    assert (shifted[:, 44:] == 0).mean() > 0.9 and (shifted[8:40, 24:32] == 1).mean() > 0.9
    assert (shifted[8:40, 8:14] == 1).sum() == 0
    clean = np.where(cam > 0.05, cam, 0).astype(np.float32)
    np.testing.assert_array_equal(confident_seeds(image, {0: clean}, SeedParams(shift=BackgroundRule("fixed", 0.0))),
                                  confident_seeds(image, {0: clean}, SeedParams()))
    cfg = load_config("demo")
    assert SeedParams.from_config(cfg.a2gnn.seeds, cfg.inference).shift == BackgroundRule.from_section(
        cfg.inference, "inference")
    with pytest.raises(ConfigError, match="a2gnn.seeds.shift"):
        SeedParams.from_config(load_config("demo", ["a2gnn.seeds.shift=zero"]).a2gnn.seeds, cfg.inference)


def test_padding_is_unlabelled_not_background():
    seeds = np.zeros((5, 6), np.uint8)
    seeds[1, 1] = 3
    padded = pad_seeds(seeds, (8, 8))
    assert padded.shape == (8, 8)
    np.testing.assert_array_equal(padded[:5, :6], seeds)
    assert (padded[5:] == 255).all() and (padded[:, 6:] == 255).all()
    with pytest.raises(ValueError):
        pad_seeds(seeds, (4, 8))


def test_box_seeds_from_a_mask_reproduce_its_tight_boxes(tmp_path):
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 3:20] = 2               # class 1, two separate regions
    mask[30:38, 40:49] = 2
    mask[18:28, 10:30] = 7             # class 6, touching an ignored band
    mask[18:28, 30:33] = 255
    boxes = boxes_from_mask(mask)
    assert boxes == [Box(1, 3, 5, 19, 14), Box(1, 40, 30, 48, 37), Box(6, 10, 18, 29, 27)]
    seeds = box_seeds(mask.shape, boxes)
    fg = (mask > 0) & (mask < 255)
    np.testing.assert_array_equal(seeds[fg], mask[fg])              # tight boxes of rectangles = the mask
    assert (seeds[~fg & (mask != 255)] == 0).all()
    # the text format round-trips, names work, and the smaller box wins on overlaps
    write_box_file(tmp_path / "a.txt", boxes)
    assert read_boxes(tmp_path, "a", ["aeroplane", "bicycle"] + ["c"] * 18) == boxes
    (tmp_path / "b.txt").write_text("# class x0 y0 x1 y1\nbicycle 0 0 9 9  # big\n0 2 2 4 4\n")
    small = read_box_file(tmp_path / "b.txt", ["aeroplane", "bicycle"])
    assert small == [Box(1, 0, 0, 9, 9), Box(0, 2, 2, 4, 4)]
    over = box_seeds((10, 10), small)
    assert over[3, 3] == 1 and over[8, 8] == 2
    (tmp_path / "c.txt").write_text("1 0 0 5\n")
    with pytest.raises(ValueError, match="c.txt:1"):
        read_box_file(tmp_path / "c.txt", ["a", "b"])
    with pytest.raises(FileNotFoundError, match="nope"):
        read_boxes(tmp_path, "nope", ["a"])


def test_grabcut_box_seeds_keep_the_object_and_unlabel_the_rest_of_its_box():
    """A textured disc inside a loose box: GrabCut's seeds label the disc with the box class, leave the box's
    corners (background inside the box) unlabelled and everything outside the box background; a box covering the
    whole image (nothing to model the background from) falls back to the filled box."""
    rng = np.random.default_rng(0)
    image = rng.integers(20, 60, (64, 80, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:64, :80]
    disc = (yy - 32) ** 2 + (xx - 40) ** 2 <= 14 ** 2
    image[disc] = rng.integers(190, 240, (int(disc.sum()), 3)).astype(np.uint8)
    box = Box(2, 20, 12, 60, 52)
    seeds = grabcut_box_seeds(image, [box])
    inside = np.zeros_like(disc)
    inside[12:53, 20:61] = True
    assert (seeds[~inside] == 0).all()
    assert (seeds[disc] == 3).mean() > 0.95                         # the object keeps its class
    corners = inside & ((yy - 32) ** 2 + (xx - 40) ** 2 > 18 ** 2)
    assert (seeds[corners] == 255).mean() > 0.9                     # the box's background: left to the graph
    assert set(np.unique(seeds)) == {0, 3, 255}
    np.testing.assert_array_equal(grabcut_box_seeds(image, [Box(1, 0, 0, 79, 63)]),
                                  box_seeds((64, 80), [Box(1, 0, 0, 79, 63)]))


def test_voc_xml_boxes_are_read_zero_based_and_clipped(tmp_path):
    (tmp_path / "x.xml").write_text(
        "<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>30</xmax>"
        "<ymax>200</ymax></bndbox></object><object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    boxes = read_voc_xml(tmp_path / "x.xml", ["cat", "dog"], size=(100, 100))
    assert boxes == [Box(1, 0, 10, 29, 99), Box(0, 4, 4, 8, 8)]
    with pytest.raises(ValueError, match="horse"):
        (tmp_path / "y.xml").write_text("<annotation><object><name>horse</name><bndbox><xmin>1</xmin>"
                                        "<ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>")
        read_voc_xml(tmp_path / "y.xml", ["cat", "dog"])
