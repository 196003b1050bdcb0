"""Drop-in support for existing SRGAN code: fuse(), peers' checkpoints, torch.compile, ONNX export.

The peer modules below are written here from the published layer and state-dict key names of
Lornatang SRGAN-PyTorch (SRResNet), BasicSR (MSRResNet) and leftthomas SRGAN (Generator), so that
their state dicts have the same keys and their forward passes the same arithmetic. Small sizes
(16 channels, 2 blocks) keep the tests fast; the converters read sizes from the tensors.
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from cases import randomize
from safetensors.torch import save_file
from tolerance import assert_within_rule
from torch import fx, nn

import fastsr
from fastsr.cli import main as cli_main
from fastsr.errors import UserError
from fastsr.fusion import FusedConv2d
from fastsr.models import load_model, save_model
from fastsr.models.peers import CheckpointFormatError
from fastsr.models.variants import MSRResNet, PeerSRResNet

C = 16  # feature channels of the test models

# ------------------------------------------------------------------------------------------------
# Peer structures (same keys and arithmetic as the published models)


class LornatangRCB(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.rcb = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(),
                                 nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.add(self.rcb(x), x)


class LornatangUp(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.upsample_block = nn.Sequential(nn.Conv2d(c, 4 * c, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU())

    def forward(self, x):
        return self.upsample_block(x)


class LornatangSRResNet(nn.Module):
    def __init__(self, scale: int = 4, c: int = C, blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 9, 1, 4), nn.PReLU())
        self.trunk = nn.Sequential(*(LornatangRCB(c) for _ in range(blocks)))
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.upsampling = nn.Sequential(*(LornatangUp(c) for _ in range(int(math.log2(scale)))))
        self.conv3 = nn.Conv2d(c, 3, 9, 1, 4)

    def forward(self, x):
        out1 = self.conv1(x)
        out = torch.add(out1, self.conv2(self.trunk(out1)))
        out = self.conv3(self.upsampling(out))
        return torch.clamp_(out, 0.0, 1.0)


class BasicSRResidualBlockNoBN(nn.Module):
    def __init__(self, c: int, res_scale: float = 1) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x))) * self.res_scale


class BasicSRMSRResNet(nn.Module):
    def __init__(self, scale: int = 4, c: int = C, blocks: int = 2) -> None:
        super().__init__()
        self.upscale = scale
        self.conv_first = nn.Conv2d(3, c, 3, 1, 1)
        self.body = nn.Sequential(*(BasicSRResidualBlockNoBN(c) for _ in range(blocks)))
        step = 2 if scale == 4 else scale
        self.upconv1 = nn.Conv2d(c, c * step * step, 3, 1, 1)
        if scale == 4:
            self.upconv2 = nn.Conv2d(c, c * 4, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(step)
        self.conv_hr = nn.Conv2d(c, c, 3, 1, 1)
        self.conv_last = nn.Conv2d(c, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)

    def forward(self, x):
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.upscale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        out += F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return out


class LeftthomasResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.prelu = nn.PReLU()
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(x)))))


class LeftthomasUpsample(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c * r * r, kernel_size=3, padding=1)
        self.pixel_shuffle = nn.PixelShuffle(r)
        self.prelu = nn.PReLU()

    def forward(self, x):
        return self.prelu(self.pixel_shuffle(self.conv(x)))


class LeftthomasGenerator(nn.Module):
    def __init__(self, scale: int = 4, c: int = C) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, c, kernel_size=9, padding=4), nn.PReLU())
        for i in range(2, 7):
            setattr(self, f"block{i}", LeftthomasResidualBlock(c))
        self.block7 = nn.Sequential(nn.Conv2d(c, c, kernel_size=3, padding=1), nn.BatchNorm2d(c))
        ups = [LeftthomasUpsample(c, 2) for _ in range(int(math.log2(scale)))]
        self.block8 = nn.Sequential(*ups, nn.Conv2d(c, 3, kernel_size=9, padding=4))

    def forward(self, x):
        b1 = self.block1(x)
        b = b1
        for i in range(2, 7):
            b = getattr(self, f"block{i}")(b)
        out = self.block8(b1 + self.block7(b))
        return (torch.tanh(out) + 1) / 2


PEERS = {
    "lornatang": (LornatangSRResNet, 2 + 1),  # class, number of skip additions (blocks + global)
    "basicsr": (BasicSRMSRResNet, 2 + 1),
    "leftthomas": (lambda scale: LeftthomasGenerator(scale), 5 + 1),
}


def make_peer(fmt: str, scale: int, seed: int = 0) -> nn.Module:
    cls = PEERS[fmt][0]
    return randomize(cls(scale), seed)


def assert_close_to_reference(ours: torch.Tensor, model: nn.Module, x: torch.Tensor) -> None:
    """The tolerance rule (docs/architecture.md, tests/tolerance.py), elementwise:
    |ours - ref64| <= 2 |torch same dtype - ref64| + atol, with ref64 the original model in float64
    and "torch same dtype" the original model in ours' dtype, both on the torch backend."""
    with fastsr.use_backend("torch"), torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        same = model(x.clone())
    assert_within_rule(type(model).__name__, ours, ref64, same, same.dtype)


def fused_skips(gm: fx.GraphModule) -> int:
    """Fused layers that take a residual (call_module of a FusedConv2d with two arguments)."""
    modules = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], FusedConv2d)
               and len(n.args) == 2)


# ------------------------------------------------------------------------------------------------
# fuse()


@pytest.mark.parametrize("fmt,scale", [("lornatang", 4), ("basicsr", 3), ("basicsr", 4), ("leftthomas", 2)])
def test_fuse_peer_models_match_and_fuse_every_pattern(fmt, scale):
    peer = make_peer(fmt, scale)
    x = torch.rand(3, 3, 11, 13)
    with torch.no_grad():
        before = peer(x)
    num_convs = sum(isinstance(m, nn.Conv2d) for m in peer.modules())
    fused = fastsr.fuse(peer)
    assert isinstance(fused, fx.GraphModule)
    # every conv became a fused layer, and no BatchNorm / activation / PixelShuffle runs on its own
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == num_convs
    assert not [m for m in fused.modules() if isinstance(m, (nn.BatchNorm2d, nn.PReLU, nn.ReLU, nn.LeakyReLU,
                                                                 nn.PixelShuffle))]
    assert fused_skips(fused) == PEERS[fmt][1]
    assert not any(n.target in (operator.add, operator.iadd, torch.add) and all(isinstance(a, fx.Node) for a in n.args)
                   for n in fused.graph.nodes), "a skip addition was left unfused"
    with torch.no_grad():  # the original model is untouched
        torch.testing.assert_close(peer(x), before, rtol=0, atol=0)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fused(x), peer, x)
        x_cl = torch.rand(1, 3, 7, 5).contiguous(memory_format=torch.channels_last)
        assert_close_to_reference(fused(x_cl), peer, x_cl)


class _ShapeAssertingModel(nn.Module):
    """Lornatang-style blocks under a forward that torch.fx cannot trace (an assert on the shape),
    plus a stride-2 conv and a BatchNorm without running stats that must stay unfused."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), nn.BatchNorm2d(C), nn.LeakyReLU(0.2))
        self.blocks = nn.Sequential(LornatangRCB(C), LornatangRCB(C))
        self.down = nn.Conv2d(C, C, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(C, track_running_stats=False)
        self.up = nn.Sequential(nn.Conv2d(C, 4 * 3, 3, 1, 1), nn.PixelShuffle(2), nn.ReLU())

    def forward(self, x):
        assert x.shape[1] == 3, "RGB input expected"
        y = self.blocks(self.head(x))
        return self.up(self.norm(self.down(y)))


def test_fuse_walks_modules_that_do_not_trace():
    model = randomize(_ShapeAssertingModel(), 1)
    with pytest.raises(Exception):  # noqa: B017 - the premise: fx cannot trace it
        fx.symbolic_trace(model)
    fused = fastsr.fuse(model)
    assert type(fused) is _ShapeAssertingModel
    assert isinstance(fused.head[0], FusedConv2d) and isinstance(fused.head[1], nn.Identity)
    assert isinstance(fused.up[0], FusedConv2d) and fused.up[0].shuffle == 2
    assert all(isinstance(b, fx.GraphModule) and fused_skips(b) == 1 for b in fused.blocks)
    assert type(fused.down) is nn.Conv2d  # stride 2: not a conv2d_prelu
    assert type(fused.norm) is nn.BatchNorm2d  # batch statistics even in eval mode
    x = torch.rand(2, 3, 10, 14)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fused(x), model, x)


class _FunctionalForms(nn.Module):
    """Patterns written with functions and methods; a constant multiplier; a broadcast addition."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 5, padding=2, bias=False)
        self.b = nn.Conv2d(C, 4 * C, 3, padding="same")
        self.c = nn.Conv2d(C, 4 * C, 3, padding=1)
        self.d = nn.Conv2d(4 * C, C, 1)
        self.offset = nn.Parameter(torch.randn(1, C, 1, 1))

    def forward(self, x):
        y = F.leaky_relu(self.a(x), 0.3)
        z = F.relu(F.pixel_shuffle(self.b(y), 2))
        z = self.c(z).relu() * 0.5 + F.interpolate(torch.cat([y] * 4, 1), scale_factor=2)
        return self.d(z) + self.offset  # broadcast: must stay a plain addition


class _InPlaceSkip(nn.Module):
    """``+=`` that updates the skip tensor, read afterwards through another name: not a fusable skip."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        a = x * 2
        b = a
        b += self.c(x)
        return a


def test_fuse_functional_forms_multiplier_and_broadcast_skip():
    model = randomize(_FunctionalForms(), 13)
    fused = fastsr.fuse(model)
    layers = {name: m for name, m in fused.named_modules() if isinstance(m, FusedConv2d)}
    assert set(layers) == {"a", "b", "c", "d"}
    assert layers["a"].activation == "leaky_relu" and layers["b"].shuffle == 2 and layers["b"].activation == "relu"
    assert fused_skips(fused) == 2  # c's interpolate skip; d's (1, C, 1, 1) offset falls back at run time
    x = torch.rand(2, 3, 7, 9)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fused(x), model, x)
    # EDSR/BasicSR res_scale != 1 is folded into the second conv
    block = randomize(BasicSRResidualBlockNoBN(C, res_scale=0.2), 14)
    fused_block = fastsr.fuse(block)
    assert fused_skips(fused_block) == 1
    features = torch.randn(2, C, 7, 9)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fused_block(features), block, features)
    in_place = randomize(_InPlaceSkip(), 15)
    fused_in_place = fastsr.fuse(in_place)
    assert type(fused_in_place) is _InPlaceSkip  # fx mis-traces it (the sum is dropped): module walk
    assert isinstance(fused_in_place.c, FusedConv2d)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fused_in_place(x), in_place, x)


class _SiLUNet(nn.Module):
    """Conv -> SiLU (functional), Conv -> BN -> SiLU (modules), and conv -> shuffle -> SiLU, which
    conv2d_silu cannot take (it has no shuffle): that one stays a plain fused conv + F.silu."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.act = nn.SiLU()
        self.up = nn.Conv2d(C, 4 * C, 3, padding=1)

    def forward(self, x):
        y = F.silu(self.a(x))
        y = self.act(self.bn(self.b(y))) + y
        return F.silu(F.pixel_shuffle(self.up(y), 2))


def test_fuse_conv_silu_patterns():
    from fastsr.nn import ConvSiLU

    model = randomize(_SiLUNet(), 16)
    fused = fastsr.fuse(model)
    silu = {name for name, m in fused.named_modules() if type(m) is ConvSiLU}
    assert silu == {"a", "b"}
    assert isinstance(fused.up, FusedConv2d) and fused.up.shuffle == 2 and fused.up.activation is None
    x = torch.rand(2, 3, 7, 9)
    for backend in ("torch", "cpp"):
        with fastsr.use_backend(backend), torch.no_grad():
            assert_close_to_reference(fused(x), model, x)
    seq = randomize(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.SiLU(), nn.Conv2d(C, 3, 3, padding=1)), 17)
    fused_seq = fastsr.fuse(seq)
    assert type(fused_seq[0]) is ConvSiLU and isinstance(fused_seq[1], nn.Identity)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(fused_seq(x), seq, x)


def test_fuse_keeps_fastsr_models_and_float64():
    model = fastsr.SRResNet(scale=2, num_blocks=2, channels=C).eval()
    randomize(model, 2)
    fused = fastsr.fuse(model)
    x = torch.rand(1, 3, 9, 7, dtype=torch.float64)
    peer64 = fastsr.fuse(make_peer("lornatang", 2).double())
    with fastsr.use_backend("torch"), torch.no_grad():
        # fuse() runs channels_last: the same layout gives the same bits
        cl = torch.channels_last
        torch.testing.assert_close(fused(x.float()), model.to(memory_format=cl)(x.float().contiguous(memory_format=cl)),
                                   rtol=0, atol=0)
        # float64 weights stay float64 through BN folding: the rule's float64 atol (1e-12)
        expected = make_peer("lornatang", 2).double()(x)
        assert_within_rule("fused float64 peer", peer64(x), expected, expected, torch.float64)


# ------------------------------------------------------------------------------------------------
# Peers' checkpoints


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _check_converted(path, peer: nn.Module, cls: type, scale: int, tmp_path) -> nn.Module:
    model = load_model(path)
    assert type(model) is cls and model.config["scale"] == scale and not model.training
    x = torch.rand(2, 3, 9, 11)
    with fastsr.use_backend("torch"), torch.no_grad():
        ours = model(x)
        assert_close_to_reference(ours, peer, x)
        # and the converted model round-trips through fastsr's own file format
        save_model(model, tmp_path / "converted.safetensors")
        again = load_model(tmp_path / "converted.safetensors")
        assert type(again) is cls
        torch.testing.assert_close(again(x), ours, rtol=0, atol=0)
    return model


@pytest.mark.parametrize("scale", [2, 4])
def test_lornatang_pth_tar_prefers_ema_and_strips_prefixes(tmp_path, scale):
    raw, ema = make_peer("lornatang", scale, seed=3), make_peer("lornatang", scale, seed=4)
    checkpoint = {
        "epoch": 7, "best_psnr": 27.5,
        "state_dict": _prefixed(raw.state_dict(), "_orig_mod."),  # a torch.compile'd model
        # torch.optim.swa_utils.AveragedModel: "module." keys plus an n_averaged counter
        "ema_state_dict": {**_prefixed(ema.state_dict(), "module."), "n_averaged": torch.tensor(12)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
    }
    path = tmp_path / f"SRResNet_x{scale}.pth.tar"
    torch.save(checkpoint, path)
    model = _check_converted(path, ema, PeerSRResNet, scale, tmp_path)
    assert model.config["output"] == "clamp" and model.config["num_blocks"] == 2 and model.config["channels"] == C
    # the raw weights on request
    raw_model = fastsr.models.peers.load_checkpoint(path, prefer_ema=False)
    x = torch.rand(1, 3, 8, 8)
    with fastsr.use_backend("torch"), torch.no_grad():
        assert_close_to_reference(raw_model(x), raw, x)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_basicsr_msrresnet(tmp_path, scale):
    raw, ema = make_peer("basicsr", scale, seed=5), make_peer("basicsr", scale, seed=6)
    path = tmp_path / f"MSRResNet_x{scale}.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    _check_converted(path, ema, MSRResNet, scale, tmp_path)


def test_basicsr_as_plain_safetensors(tmp_path):
    peer = make_peer("basicsr", 3, seed=7)
    path = tmp_path / "msrresnet_x3.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))  # no fastsr metadata
    _check_converted(path, peer, MSRResNet, 3, tmp_path)


def test_leftthomas_generator(tmp_path):
    peer = make_peer("leftthomas", 4, seed=8)
    path = tmp_path / "netG_epoch_4_100.pth"
    torch.save(_prefixed(peer.state_dict(), "module."), path)  # saved from nn.DataParallel
    model = _check_converted(path, peer, PeerSRResNet, 4, tmp_path)
    assert model.config["output"] == "tanh" and model.config["num_blocks"] == 5


def test_fastsr_training_checkpoint(tmp_path):
    raw = randomize(fastsr.SRResNet(scale=2, num_blocks=3, channels=8), 15)
    ema = randomize(fastsr.SRResNet(scale=2, num_blocks=3, channels=8), 16)
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "stage": "pretrain", "model": raw.state_dict(), "ema": ema.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}}, path)
    model = _check_converted(path, ema, fastsr.SRResNet, 2, tmp_path)
    assert model.config["num_blocks"] == 3 and model.config["channels"] == 8


def test_unknown_or_partial_checkpoints_list_the_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.rand(3), "decoder.bias": torch.rand(3)}, path)
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format.*decoder.bias, encoder.weight"):
        load_model(path)
    assert issubclass(CheckpointFormatError, UserError)
    state = make_peer("lornatang", 2).state_dict()
    state["trunk.0.rcb.5.weight"] = torch.rand(C)  # a layer fastsr's SRResNet does not have
    torch.save(state, path)
    with pytest.raises(CheckpointFormatError, match=r"cannot place these keys.*trunk\.0\.rcb\.5\.weight"):
        load_model(path)
    del state["trunk.0.rcb.5.weight"], state["conv2.1.running_var"]
    torch.save(state, path)
    with pytest.raises(CheckpointFormatError, match=r"no weights for body_tail\.bn\.running_var"):
        load_model(path)
    torch.save({"params": {}, "note": "empty"}, path)
    with pytest.raises(CheckpointFormatError, match="found no generator weights"):
        load_model(path)


def test_checkpoints_load_without_unpickling_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": make_peer("basicsr", 2).state_dict(), "config": _ShapeAssertingModel}, path)
    with pytest.raises(fastsr.models.checkpoint.ModelFileError,
                       match=r"refused: it would import test_dropin\._ShapeAssertingModel when loaded; fastsr "
                             r"reads weights only and never runs code"):
        load_model(path)


def test_convert_command(tmp_path, capsys):
    peer = make_peer("leftthomas", 2, seed=9)
    src, dst = tmp_path / "g.pth", tmp_path / "g.safetensors"
    torch.save(peer.state_dict(), src)
    assert cli_main(["convert", str(src), str(dst), "--dtype", "fp16"]) == 0
    assert "peer_srresnet" in capsys.readouterr().out
    model = load_model(dst)
    assert model.head.conv.weight.dtype == torch.float32  # loaded back at the model's precision
    torch.save({"foo": torch.rand(2)}, src)
    assert cli_main(["convert", str(src), str(dst)]) == 2
    assert "foo" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# torch.compile and ONNX


def test_torch_compile_fullgraph_on_the_torch_backend():
    """fullgraph=True: the whole forward is one graph (no break at the backend dispatch). Inductor
    compiles fastsr's SRResNet; the other models use the aot_eager backend, which captures the same
    graph without Inductor's C++ code generation (about 20 s per model on this 2-core machine)."""
    torch._dynamo.reset()
    models = [(randomize(fastsr.SRResNet(scale=2, num_blocks=1, channels=8), 10), "inductor"),
              (randomize(MSRResNet(scale=3, num_blocks=1, channels=8), 11), "aot_eager"),
              (fastsr.fuse(randomize(LornatangSRResNet(scale=2, c=8, blocks=1), 12)), "aot_eager")]
    x = torch.rand(1, 3, 10, 9)
    with fastsr.use_backend("torch"), torch.no_grad():
        for model, compiler in models:
            compiled = torch.compile(model, fullgraph=True, backend=compiler)
            assert_close_to_reference(compiled(x), model, x)


def test_onnx_export_dynamic_height_and_width(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra; not installed here")
    pytest.importorskip("onnx", reason="onnx is in the dev extra; not installed here")
    model = randomize(MSRResNet(scale=4, num_blocks=1, channels=8), 12)
    src = tmp_path / "m.safetensors"
    save_model(model, src)
    out = tmp_path / "m.onnx"
    assert cli_main(["export", str(src), str(out)]) == 0
    assert "opset 17" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 16, 16), (2, 3, 13, 7)]:  # neither is the 32x32 export example
        x = torch.rand(shape)
        (y,) = session.run(None, {"lr": x.numpy()})
        with fastsr.use_backend("torch"):  # the reference: the plain PyTorch composition
            assert_close_to_reference(torch.from_numpy(y), model, x)
