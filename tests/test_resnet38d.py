"""ResNet-38 backbone: shapes and output stride, parameter count, reference naming, freezing, dropout."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from smaf.models.resnet38d import ResNet38d

EXPECTED_PARAMETERS = 105_070_912


@pytest.fixture(scope="module")
def model() -> ResNet38d:
    torch.manual_seed(0)
    net = ResNet38d()
    # Non-trivial BN statistics, so that a BN running in train mode would visibly change them and the output.
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    return net


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS
    assert model.out_channels == 4096


def test_reference_module_names(model):
    names = dict(model.named_children())
    blocks = (["conv1a", "b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4"] + [f"b4_{i}" for i in range(1, 6)]
              + ["b5", "b5_1", "b5_2", "b6", "b7", "bn7"])
    assert list(names) == blocks
    keys = set(model.state_dict())
    for key in ("conv1a.weight", "b2.conv_branch1.weight", "b2.bn_branch2a.running_mean", "b4_5.conv_branch2b1.weight",
                "b5.conv_branch1.weight", "b5_2.bn_branch2b1.bias", "b6.conv_branch2b2.weight",
                "b6.bn_branch2b2.running_var", "b7.conv_branch1.weight", "bn7.weight", "bn7.running_var"):
        assert key in keys, key
    # Projection shortcuts exist only where the shape changes.
    assert not any(k.startswith(("b2_1.conv_branch1", "b4_3.conv_branch1", "b5_1.conv_branch1")) for k in keys)
    # b5's first 3x3 has dilation 1, the others 2; b6/b7's 3x3 dilation 4; BN eps as in the MXNet model.
    assert model.b5.conv_branch2a.dilation == (1, 1) and model.b5.conv_branch2b1.dilation == (2, 2)
    assert model.b5_1.conv_branch2a.dilation == (2, 2)
    assert model.b6.conv_branch2b1.dilation == (4, 4) and model.b7.conv_branch2b1.dilation == (4, 4)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@torch.no_grad()
def test_output_shapes_448(model):
    model.eval()
    out = model(torch.randn(1, 3, 448, 448))
    assert tuple(out["conv3"].shape) == (1, 256, 112, 112)
    assert tuple(out["conv4"].shape) == (1, 512, 56, 56)
    assert tuple(out["conv5"].shape) == (1, 1024, 56, 56)
    assert tuple(out["conv6"].shape) == (1, 4096, 56, 56)
    assert out["conv6"].min() >= 0 and out["conv4"].min() >= 0  # post-ReLU features


@torch.no_grad()
def test_output_shapes_321x500(model):
    model.eval()
    out = model(torch.randn(1, 3, 321, 500))
    # Stride-2 convs with padding 1 round up: 321 -> 161 -> 81 -> 41, 500 -> 250 -> 125 -> 63.
    assert tuple(out["conv3"].shape) == (1, 256, 81, 125)
    for key, channels in (("conv4", 512), ("conv5", 1024), ("conv6", 4096)):
        assert tuple(out[key].shape) == (1, channels, 41, 63), key


def test_train_eval_return_module_and_bn_stays_frozen(model):
    assert model.train() is model
    assert model.training
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 37
    assert all(not m.training for m in batchnorms)
    assert all(not p.requires_grad for m in batchnorms for p in m.parameters())
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert all(m.training for m in dropouts)
    assert model.eval() is model
    assert not any(m.training for m in model.modules())


def test_frozen_parameters_get_no_gradient_and_bn_statistics_do_not_move(model):
    model.train()
    stats_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(1, 3, 64, 64))  # small: the full backward is what costs
    (out["conv6"].mean() + out["conv4"].mean() + out["conv5"].mean()).backward()

    frozen_prefixes = ("conv1a.", "b2.", "b2_1.", "b2_2.")
    for name, param in model.named_parameters():
        is_bn = ".bn_" in name or name.startswith("bn7.")
        if name.startswith(frozen_prefixes) or is_bn:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "b3.conv_branch2a.weight" in trainable and "b7.conv_branch2b2.weight" in trainable
    for key, before in stats_before.items():
        assert torch.equal(model.state_dict()[key], before), key
    model.zero_grad(set_to_none=True)


def test_dropout2d_in_bottlenecks_active_only_in_train_mode(model):
    dropouts = {n: m for n, m in model.named_modules() if isinstance(m, nn.Dropout2d)}
    assert sorted(dropouts) == ["b6.dropout_2b1", "b6.dropout_2b2", "b7.dropout_2b1", "b7.dropout_2b2"]
    assert model.b6.dropout_2b1.p == model.b6.dropout_2b2.p == 0.3
    assert model.b7.dropout_2b1.p == model.b7.dropout_2b2.p == 0.5
    # Only b6/b7 hold dropout, so running them alone (on a conv5-sized input) is enough and much cheaper.
    conv5_like = torch.randn(1, 1024, 6, 5)
    with torch.no_grad():
        model.train()
        train_a, train_b = model.b7(model.b6(conv5_like)), model.b7(model.b6(conv5_like))
        model.eval()
        eval_a, eval_b = model.b7(model.b6(conv5_like)), model.b7(model.b6(conv5_like))
    assert not torch.equal(train_a, train_b)
    assert torch.equal(eval_a, eval_b)
    assert tuple(eval_a.shape) == (1, 4096, 6, 5)


def test_inference_copy_folds_the_mid_block_batchnorms(model):
    """Each block's middle BN directly follows a conv (b6/b7 have two), so inference copies fold it; the input
    BN of a block acts on the sum of branches and stays. The copy gives the same features."""
    from smaf.models.fold import OneDNNPointwiseConv, inference_copy, onednn_pointwise_available
    from smaf.models.resnet38d import BottleneckBlock, ResBlock

    model.eval()
    copy_, note = inference_copy(model, torch.device("cpu"))
    blocks = [m for m in model.children() if isinstance(m, (ResBlock, BottleneckBlock))]
    assert len(blocks) == 17
    assert note.startswith(f"inference copy of the model: {len(blocks) + 2} conv+BN pairs folded")
    kept = sum(isinstance(m, nn.BatchNorm2d) for m in copy_.modules())
    assert kept == len(blocks) + 1   # bn_branch2a of every block + bn7
    if onednn_pointwise_available():   # the bottlenecks' first 1x1 convs (stride 1) run with their ReLU
        assert isinstance(copy_.b6.conv_branch2a, OneDNNPointwiseConv) and copy_.b6.conv_branch2a.post_op == "relu"
        assert isinstance(copy_.b7.conv_branch2a, OneDNNPointwiseConv)
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        ref, out = model(x)["conv6"], copy_(x)["conv6"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
