import pytest
import torch
from tolerance import assert_within_rule

import fastsr
from fastsr.models import Discriminator, SRResNet


def test_srresnet_x4_has_the_papers_parameter_count():
    model = SRResNet(scale=4)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_547_350


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_srresnet_output_shape(scale):
    model = SRResNet(scale=scale, num_blocks=2).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 7, 11))
    assert out.shape == (2, 3, 7 * scale, 11 * scale)


def test_srresnet_rejects_unsupported_scale():
    with pytest.raises(ValueError, match="scale must be 2, 4 or 8"):
        SRResNet(scale=3)


def test_srresnet_layers_match_the_paper():
    model = SRResNet(scale=4)
    assert model.head.conv.kernel_size == (9, 9) and model.head.activation == "prelu"
    assert len(model.body) == 16
    block = model.body[0]
    assert block.conv1.conv.bias is None and block.conv1.bn is not None and block.conv1.activation == "prelu"
    assert block.conv2.conv.bias is None and block.conv2.bn is not None and block.conv2.activation is None
    assert model.body_tail.bn is not None and model.body_tail.activation is None
    assert [b.conv.conv.out_channels for b in model.upsample] == [256, 256]
    assert all(b.conv.shuffle == 2 for b in model.upsample)
    assert model.tail.conv.kernel_size == (9, 9) and model.tail.conv.out_channels == 3


def _plain_torch_srresnet_forward(model: SRResNet, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The paper's generator written with torch.nn.functional only, from the same parameters."""
    import torch.nn.functional as F

    def layer(m, x):
        y = F.conv2d(x, m.conv.weight, m.conv.bias, padding=m.conv.padding)
        if m.bn is not None:
            mean, var = (None, None) if training else (m.bn.running_mean, m.bn.running_var)
            y = F.batch_norm(y, mean, var, m.bn.weight, m.bn.bias, training, 0.0, m.bn.eps)
        if m.shuffle > 1:
            y = F.pixel_shuffle(y, m.shuffle)
        return F.prelu(y, m.slope) if m.slope is not None else y

    feat = layer(model.head, x)
    h = feat
    for block in model.body:
        h = layer(block.conv2, layer(block.conv1, h)) + h
    h = layer(model.body_tail, h) + feat
    for up in model.upsample:
        h = layer(up.conv, h)
    return layer(model.tail, h)


@pytest.mark.parametrize("training", [False, True])
def test_srresnet_matches_a_plain_torch_composition(training):
    torch.manual_seed(0)
    model = SRResNet(scale=4, num_blocks=3).double()
    for m in model.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 3, 9, 8, dtype=torch.float64)
    model.train(training)  # eval folds BN into the convs; training uses batch statistics
    with fastsr.use_backend("torch"):
        ours = model(x)
    expected = _plain_torch_srresnet_forward(model, x, training)
    # The rule in float64: the composition is both the reference and the same-dtype baseline.
    assert_within_rule("SRResNet", ours, expected, expected, torch.float64)


@pytest.mark.parametrize("size", [96, 64, 130])
def test_discriminator_output(size):
    d = Discriminator()
    assert d(torch.rand(2, 3, size, size)).shape == (2,)


def test_discriminator_layers_match_the_paper():
    d = Discriminator()
    convs = [m for m in d.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.features) == 7
    linears = [m for m in d.classifier if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [1024, 1]


def _conv_input_formats(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[bool]]:
    """Run ``model`` on ``x``; return the output and whether each fused conv saw a channels_last input."""
    seen: set[bool] = set()
    convs = [m for m in model.modules() if type(m).__name__ in ("ConvPReLU", "FusedConv2d")]
    assert convs
    hooks = [m.register_forward_pre_hook(lambda _, a: seen.add(a[0].is_contiguous(memory_format=torch.channels_last)))
             for m in convs]
    with torch.no_grad(), fastsr.use_backend("torch"):
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("prepare", ["optimize", "fuse"])
def test_prepared_models_take_nchw_input_as_channels_last_once(prepare):
    """Memory format is not the caller's problem: an NCHW input is converted once at the entry of an
    optimised or fused model, so every layer runs channels_last, with the same result."""
    model = SRResNet(scale=2, num_blocks=2, channels=8).eval()
    prepared = fastsr.optimize(model) if prepare == "optimize" else fastsr.fuse(model)
    x = torch.rand(1, 3, 9, 13, generator=torch.Generator().manual_seed(0))
    out_nchw, seen_nchw = _conv_input_formats(prepared, x)
    out_cl, seen_cl = _conv_input_formats(prepared, x.contiguous(memory_format=torch.channels_last))
    assert seen_nchw == seen_cl == {True}
    assert torch.equal(out_nchw, out_cl)
