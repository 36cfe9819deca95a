"""The MiT (SegFormer) backbones (smaf.models.mit): stage shapes and strides, the attention-logit output, the
official mit_b*.pth key layout and its loader, and the networks built on them."""
from __future__ import annotations

import math

import pytest
import torch

from smaf.models import build_backbone, build_from_spec, build_model
from smaf.models.affinity import build_affinity_net
from smaf.models.mit import MIT_VARIANTS, MixVisionTransformer, load_mit_weights
from smaf.models.weights import WeightsError

H, W = 97, 130


def official_mit_keys(depths) -> list[str]:
    """The keys of an official ImageNet mit_b*.pth (NVlabs/SegFormer), written out from its layout."""
    keys = []
    for s in range(1, 5):
        keys += [f"patch_embed{s}.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
        for i in range(depths[s - 1]):
            parts = ["norm1", "attn.q", "attn.kv", "attn.proj"] + (["attn.sr", "attn.norm"] if s < 4 else [])
            parts += ["norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            keys += [f"block{s}.{i}.{m}.{p}" for m in parts for p in ("weight", "bias")]
        keys += [f"norm{s}.weight", f"norm{s}.bias"]
    return keys + ["head.weight", "head.bias"]


@pytest.mark.parametrize("output_stride, strides", [(32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_stage_shapes_and_strides(output_stride, strides):
    torch.manual_seed(0)
    model = MixVisionTransformer("mit_b0", output_stride).eval()
    assert model.stage_strides == strides and model.output_stride == output_stride
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    for s, (dim, stride) in enumerate(zip((32, 64, 160, 256), strides), start=1):
        assert out[f"stage{s}"].shape == (2, dim, math.ceil(H / stride), math.ceil(W / stride)), s
    assert out["conv6"] is out["stage4"] and model.out_channels == 256


def test_small_inputs_run_and_large_grids_are_not_padded():
    # a 24 x 20 input gives a 6 x 5 stage-1 grid, under the reduction ratio 8 (SegFormer's conv fails there): the
    # grid is zero-padded to 8 x 8, one key; a grid of at least R per side goes through the conv unchanged
    torch.manual_seed(0)
    model = MixVisionTransformer("mit_b0", 8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 24, 20))
    assert out["stage4"].shape == (1, 256, 3, 3) and torch.isfinite(out["stage4"]).all()
    attn = model.block1[0].attn
    x = torch.randn(1, 6 * 5, attn.q.in_features)
    _, logits = attn(x, 6, 5, return_logits=True)
    assert logits.shape == (1, attn.num_heads, 30, 1)
    x = torch.randn(1, 9 * 8, attn.q.in_features)
    grid = x.transpose(1, 2).reshape(1, -1, 9, 8)
    keys = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))
    _, logits = attn(x, 9, 8, return_logits=True)
    q = attn.q(x).reshape(1, 72, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.kv(keys)[..., :q.shape[1] * attn.head_dim].reshape(1, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    assert torch.allclose(logits, q @ k.transpose(-2, -1), atol=1e-5)


def test_parameter_counts_match_segformer():
    # SegFormer's encoder sizes (millions): B0 3.3-3.4, B1 13.1, B2 24.2, B3 44.0, B4 60.8, B5 81.4
    expected = {"mit_b0": 3.3, "mit_b1": 13.1, "mit_b2": 24.2, "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4}
    for variant, millions in expected.items():
        with torch.device("meta"):
            model = MixVisionTransformer(variant)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.01), variant


def test_attention_logits_per_block():
    torch.manual_seed(0)
    model = MixVisionTransformer("mit_b1", 16).eval()   # AFA's layout: strides [4, 2, 2, 1]
    captured = {}

    def keep_input(module, args):
        captured.setdefault("x", args[0])

    model.block4[1].attn.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), return_attn=True)
        plain = model(torch.randn(1, 3, 64, 96))
    logits = out["attn_logits"]
    assert [len(stage) for stage in logits] == [2, 2, 2, 2]
    grids = [(16, 24), (8, 12), (4, 6), (4, 6)]     # stage 4 at stride 16
    for stage, ((h, w), heads, sr) in enumerate(zip(grids, (1, 2, 5, 8), (8, 4, 2, 1))):
        for block_logits in logits[stage]:
            assert block_logits.shape == (1, heads, h * w, (h // sr) * (w // sr)), stage
    assert "attn_logits" not in plain
    # the last block's logits by hand: q k^T from its own projections, before scaling and softmax
    attn, x = model.block4[1].attn, captured["x"]
    q = attn.q(x).reshape(1, -1, 8, 64).transpose(1, 2)
    k = attn.kv(x)[..., :512].reshape(1, -1, 8, 64).transpose(1, 2)
    assert torch.allclose(logits[3][1], q @ k.transpose(-2, -1), atol=1e-4)


def test_attention_logits_do_not_change_the_features():
    torch.manual_seed(0)
    model = MixVisionTransformer("mit_b0", 32).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)["conv6"], model(x, return_attn=True)["conv6"], atol=1e-5)


@pytest.mark.parametrize("variant", ["mit_b0", "mit_b2"])
def test_module_keys_are_the_official_layout(variant):
    with torch.device("meta"):
        model = MixVisionTransformer(variant)
    assert sorted(model.state_dict()) == sorted(official_mit_keys(MIT_VARIANTS[variant].depths)[:-2])


def _official_file(tmp_path, variant="mit_b0", seed=1):
    """A file as the official release lays it out (+ the ImageNet head), nested and DataParallel-prefixed."""
    torch.manual_seed(seed)
    source = MixVisionTransformer(variant)
    state = {**source.state_dict(), "head.weight": torch.randn(1000, source.out_channels),
             "head.bias": torch.zeros(1000)}
    assert sorted(state) == sorted(official_mit_keys(MIT_VARIANTS[variant].depths))
    path = tmp_path / f"{variant}.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return source, path


def test_official_file_round_trips(tmp_path):
    source, path = _official_file(tmp_path)
    loaded = build_backbone("mit_b0", str(path), 16)    # the AFA stride: same weights, stage 4 at stride 1
    assert loaded.patch_embed4.proj.stride == (1, 1)
    own = loaded.state_dict()
    assert len(own) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(own[key], value), key


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    source, path = _official_file(tmp_path)
    state = {k: v for k, v in source.state_dict().items() if k != "block2.1.mlp.fc2.bias"}
    state["block5.0.attn.q.weight"] = torch.zeros(1)
    bad = tmp_path / "mit_b0_bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError) as err:
        load_mit_weights(MixVisionTransformer("mit_b0"), bad)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message
    assert "missing 1" in message and "block2.1.mlp.fc2.bias" in message
    assert "unexpected 1" in message and "block5.0.attn.q.weight" in message
    with pytest.raises(WeightsError, match="shape-mismatched") as err:   # a B0 file for a B1 model
        build_backbone("mit_b1", str(path), 32)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="mit_b1.pth"):
        build_backbone("mit_b1", "imagenet", 16)
    with pytest.raises(ValueError, match="output stride"):
        build_backbone("mit_b1", "", 4)


def test_cam_deeplab_and_affinity_networks_run_on_mit():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 80)
    cam = build_model({"backbone": "mit_b0", "pretrained": "", "output_stride": 16, "feat_dim": 16,
                       "head": "smaf"}, num_classes=3).eval()
    seg = build_from_spec({"arch": "deeplab_largefov", "args": {"num_classes": 3, "backbone": "mit_b0",
                                                                "output_stride": 16, "width": 32}}).eval()
    aff = build_affinity_net("mit_b0", 16).eval()
    with torch.no_grad():
        logits, cams, _ = cam(x)
        assert logits.shape == (1, 4) and cams.shape == (1, 4, 4, 5)
        assert seg(x).shape == (1, 4, 4, 5)
        assert aff(x).shape == (1, 448, 8, 10)      # the affinity feature is on the stride-8 grid
