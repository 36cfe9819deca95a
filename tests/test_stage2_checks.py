"""Stage 2's pieces with hand-computed values: the background-head calibration of a plain CAM classifier,
the mapping of whole-image denoising weights into each crop (``crop_weights``), and the one-line errors for a
stage-0 model of another class count and for missing or mis-shaped prototypes (raised before anything is
written)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smaf.cam.prototypes import save_prototypes
from smaf.checkpoint import CheckpointError, save_checkpoint
from smaf.config import Config, load_config
from smaf.runtime import StageError, error_message
from smaf.stages import train_fusion
from smaf.stages.train_fusion import calibrate_background_head, crop_weights


class _LinearHead(torch.nn.Module):
    """A plain CAM classifier that just got its background row: the 'images' are the features themselves and
    CAM = logit_scale x (1x1 classifier of them), C = 2 classes + background."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [1.0, 1.0, 1.0]])[..., None, None])
        self.logit_scale = 1.0

    def set_logit_scale(self, scale: float) -> None:
        self.logit_scale = scale

    def forward(self, x):
        cam = self.classifier(x) * self.logit_scale
        return cam.mean((2, 3)), cam, x


# two images of two pixels each: image 0 labelled {class 0}, image 1 labelled {0, 1}
FEATURES = torch.tensor([[[[4.0, 1.0]], [[1.0, 5.0]], [[0.0, 0.0]]],
                         [[[3.0, 0.0]], [[2.0, 0.0]], [[0.0, 7.0]]]])          # (2, 3, 1, 2)
LABELS = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
# class-0 CAM: [8, 2] and [6, 0] (peaks 8, 6); class-1 CAM: [3, 15] (unlabelled: left out) and [6, 0] (peak 6)
DIVISOR = (8 + 6 + 6) / 3


def test_calibration_divides_the_class_rows_by_the_mean_labelled_peak_and_zeroes_the_background_row():
    head = _LinearHead()
    assert calibrate_background_head(head, FEATURES, LABELS, "weights") == pytest.approx(DIVISOR, rel=1e-6)
    expected = torch.tensor([[2.0 * 3 / 20, 0, 0], [0, 3.0 * 3 / 20, 0], [0, 0, 0]])
    torch.testing.assert_close(head.classifier.weight[:, :, 0, 0], expected, rtol=1e-6, atol=0)
    assert head.logit_scale == 1.0
    _, cam, _ = head(FEATURES)
    torch.testing.assert_close(cam[0, :, 0], torch.tensor([[1.2, 0.3], [0.45, 2.25], [0.0, 0.0]]))


def test_calibration_scale_keeps_the_class_rows_and_scales_the_logits():
    head = _LinearHead()
    assert calibrate_background_head(head, FEATURES, LABELS, "scale") == pytest.approx(DIVISOR, rel=1e-6)
    assert head.logit_scale == pytest.approx(3 / 20, rel=1e-6)
    expected = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0]])   # only the background row changed: zero
    assert torch.equal(head.classifier.weight[:, :, 0, 0], expected)
    _, cam, _ = head(FEATURES)
    torch.testing.assert_close(cam[1, :, 0], torch.tensor([[0.9, 0.0], [0.9, 0.0], [0.0, 0.0]]))


def test_calibration_never_enlarges_the_logits():
    """Mean labelled peak below 1 (or no labels at all): the divisor is 1 and only the background row changes."""
    for features, labels in ((FEATURES / 16, LABELS), (FEATURES, torch.zeros(2, 2))):
        head = _LinearHead()
        assert calibrate_background_head(head, features, labels, "weights") == 1.0
        assert torch.equal(head.classifier.weight[:2, :, 0, 0], torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]))
        assert torch.equal(head.classifier.weight[2], torch.zeros(3, 1, 1))


def _params(orig, scaled, crop, flip=False, cont=(0, 0), img=(0, 0)):
    return {"orig_size": orig, "scaled_size": scaled, "crop": crop, "flip": flip, "cont_top": cont[0],
            "cont_left": cont[1], "img_top": img[0], "img_left": img[1]}


def test_crop_weights_read_each_samples_crop_of_the_whole_image_maps():
    """Whole-image maps (at any resolution: they span the image) sampled at the crop's target cells: a crop
    of the plain image, of the flipped image and of a 2x enlarged image, each with its own parameters."""
    full = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)      # K = 1 map per sample
    got = crop_weights(full, [_params((8, 8), (8, 8), 4, img=(2, 4)),
                              _params((8, 8), (8, 8), 4, flip=True, img=(2, 4))], 4)
    assert got.shape == (2, 1, 4, 4)
    torch.testing.assert_close(got[0, 0], full[0, 0, 2:6, 4:8])
    # flipped image columns 4..7 are the original's columns 3..0
    torch.testing.assert_close(got[1, 0], full[1, 0, 2:6, [3, 2, 1, 0]])
    # a 4x4 map of an 8x8 image shown at 16x16: the crop rows 4..11 / columns 8..15 of the enlarged image are
    # original rows 2..5 / columns 4..7, i.e. map cells [1:3, 2:4]; two target cells per side hit their centres
    small = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    got = crop_weights(small, [_params((8, 8), (16, 16), 8, img=(4, 8))], 2)
    torch.testing.assert_close(got[0, 0], small[0, 0, 1:3, 2:4])


def test_crop_weights_padding_is_zero_or_the_nearest_image_value():
    """A 4x4 image placed at row 1, column 2 of a 6x6 canvas: padding cells get 0 (``zeros``, the reference
    rule's weights) or the value of the nearest image pixel (``border``, the softmax rule's)."""
    full = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)
    params = [_params((4, 4), (4, 4), 6, cont=(1, 2))]
    zeros = crop_weights(full, params, 6)[0, 0]
    expected = torch.zeros(6, 6)
    expected[1:5, 2:6] = full[0, 0]
    torch.testing.assert_close(zeros, expected)
    border = crop_weights(full, params, 6, padding_mode="border")[0, 0]
    # canvas row r shows image row clamp(r - 1, 0, 3), canvas column c image column clamp(c - 2, 0, 3)
    expected = full[0, 0][[0, 0, 1, 2, 3, 3]][:, [0, 0, 0, 1, 2, 3]]
    torch.testing.assert_close(border, expected)


# ------------------------------------------------------------------------------ inputs that cannot work
def _cfg(root: Path, work: Path, *extra):
    lst = f"{root}/ImageSets/Segmentation"
    return load_config("demo", [f"work_dir={work}", f"data.root={root}", f"data.train_list={lst}/train.txt",
                                f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt",
                                "num_workers=0", "model.pretrained=", "train_fusion.val_every=0", *extra])


def _checkpoint(path: Path, cfg, num_classes: int) -> Path:
    from smaf.models import build_model

    return save_checkpoint(path, build_model(Config(dict(cfg.model, head="smaf")), num_classes), iteration=0)


def _stage2_error(cfg, kind):
    with pytest.raises(kind) as info:
        train_fusion.run(cfg)
    text = error_message(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_stage2_with_a_model_of_another_class_count_is_one_line_naming_the_key(tiny_voc, tmp_path):
    work, fusion = tmp_path / "work", tmp_path / "fusion"
    cfg = _cfg(tiny_voc, work)
    save_prototypes(fusion / "prototypes.pt", torch.zeros(6, 128), torch.ones(6, dtype=torch.long),
                    ["c"] * 5, 10)
    three = _checkpoint(tmp_path / "three.pth", cfg, 3)
    text = _stage2_error(_cfg(tiny_voc, work, f"train_fusion.checkpoint={three}",
                              f"train_fusion.fusion_dir={fusion}"), CheckpointError)
    assert text.startswith(f"train_fusion.checkpoint='{three}' was trained for 3 classes but the dataset has 5")
    assert not work.exists()


def test_stage2_without_prototypes_or_with_misshaped_ones_is_one_line_naming_the_file(tiny_voc, tmp_path):
    work, fusion = tmp_path / "work", tmp_path / "fusion"
    cfg = _cfg(tiny_voc, work)
    five = _checkpoint(tmp_path / "five.pth", cfg, 5)
    over = (f"train_fusion.checkpoint={five}", f"train_fusion.fusion_dir={fusion}")
    text = _stage2_error(_cfg(tiny_voc, work, *over), StageError)
    assert text == f"'{fusion / 'prototypes.pt'}' not found: run stage 1 (bash script/gen_fusion.sh) first"
    # prototypes of a 3-class run: 4 rows where the 5-class model needs 6
    save_prototypes(fusion / "prototypes.pt", torch.zeros(4, 128), torch.ones(4, dtype=torch.long), ["c"] * 3, 10)
    text = _stage2_error(_cfg(tiny_voc, work, *over), StageError)
    assert text.startswith(f"'{fusion / 'prototypes.pt'}' holds prototypes of shape (4, 128) but the model "
                           f"needs (6, 128): re-run stage 1")
    assert not work.exists()
