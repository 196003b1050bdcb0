"""Loading the checkpoints people use: ESRGAN-family RRDBNets (BasicSR/Real-ESRGAN, original ESRGAN,
BSRGAN/RealSR), Real-ESRGAN's SRVGGNetCompact, SPAN, and other architectures through spandrel.

The oracles below are plain torch modules written here from the published architectures, with
the published module names, so their state dicts have exactly the published keys. Small sizes
(8 channels, 2 blocks) keep the forward passes cheap; the full RealESRGAN_x4plus is only built and
counted. Outputs are compared by the project's tolerance rule against the oracle in float64.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tolerance import assert_within_rule
from torch import nn
from zoo_oracles import (
    BasicSRRRDBNet,
    C,
    Conv3XC,
    G,
    NewArchRRDBNet,
    OldESRGAN,
    RealESRGANCompact,
    randomize,
    span_oracle,
)

import fastsr
from fastsr.cli import main as cli_main
from fastsr.models import load_model, save_model
from fastsr.models.compact import SRVGGNetCompact
from fastsr.models.peers import CheckpointFormatError, NoNativeFormatError, convert_checkpoint, detect_format
from fastsr.models.rrdbnet import RRDBNet
from fastsr.models.span import SPAN, merge_conv3xc

# ------------------------------------------------------------------------------------------------
# Helpers


def write(state: dict[str, torch.Tensor], path, container: str):
    """``state`` as a bare .pth, inside {"params_ema": ...} as BasicSR writes it, or as safetensors."""
    if container == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    raw = {k: torch.zeros_like(v) for k, v in state.items()}  # the EMA weights must win
    torch.save(state if container == "pth" else {"params": raw, "params_ema": state}, path)
    return path


def assert_matches(model: nn.Module, oracle: nn.Module, x: torch.Tensor) -> None:
    """``model``'s output (torch backend, fp32) within the tolerance rule of the oracle's in float64."""
    with torch.no_grad(), fastsr.use_backend("torch"):
        ref64 = copy.deepcopy(oracle).double()(x.double())
        same = oracle(x.clone())
        ours = model(x)
    assert_within_rule(type(oracle).__name__, ours, ref64, same, torch.float32)


def assert_round_trips(model: nn.Module, tmp_path, x: torch.Tensor) -> None:
    """save_model / load_model give the same architecture, config and outputs."""
    save_model(model, tmp_path / "converted.safetensors")
    again = load_model(tmp_path / "converted.safetensors")
    assert type(again) is type(model) and again.config == model.config
    with torch.no_grad(), fastsr.use_backend("torch"):
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def one_line_error(path, match: str) -> str:
    with pytest.raises(CheckpointFormatError, match=match) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


CONTAINERS = pytest.mark.parametrize("container", ["pth", "params_ema", "safetensors"])
X = torch.rand(2, 3, 13, 11, generator=torch.Generator().manual_seed(0))  # odd sizes


# ------------------------------------------------------------------------------------------------
# RRDBNet layouts


@CONTAINERS
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_basicsr_rrdbnet(tmp_path, container, scale):
    oracle = randomize(BasicSRRRDBNet(scale), seed=scale)
    model = load_model(write(oracle.state_dict(), tmp_path / f"RealESRGAN_x{scale}plus.pth", container))
    assert type(model) is RRDBNet and not model.training
    assert model.config == {"arch": "rrdbnet", "scale": scale, "num_blocks": 2, "channels": C, "growth": G,
                            "in_channels": 3, "out_channels": 3}
    # pixel-unshuffled inputs must divide by 4 (x1) / 2 (x2), in BasicSR as here
    x = X if scale == 4 else torch.rand(1, 3, 12, 8)
    assert_matches(model, oracle, x)
    if container == "pth":
        assert_round_trips(model, tmp_path, x)


def test_full_realesrgan_x4plus_keys_and_parameters(tmp_path):
    """RealESRGAN_x4plus.pth's layout (23 blocks, 64 channels, growth 32): 702 tensors, 16,697,987
    parameters, under params_ema; built and converted, not run."""
    oracle = BasicSRRRDBNet(4, c=64, blocks=23, g=32)
    state = oracle.state_dict()
    assert len(state) == 702 and sum(v.numel() for v in state.values()) == 16_697_987
    model = convert_checkpoint({"params_ema": state}, "RealESRGAN_x4plus.pth")
    assert type(model) is RRDBNet and model.config["num_blocks"] == 23 and model.config["growth"] == 32
    assert len(model.state_dict()) == 702 and sum(p.numel() for p in model.parameters()) == 16_697_987
    assert torch.equal(model.body[22].rdb3.conv5.conv.weight, state["body.22.rdb3.conv5.weight"])


@CONTAINERS
@pytest.mark.parametrize("scale", [4, 8])
def test_original_esrgan_old_architecture(tmp_path, container, scale):
    oracle = randomize(OldESRGAN(scale), seed=10 + scale)
    state = oracle.state_dict()
    # the layout the converter relies on: convs at model.0, 1.sub.*, 3, 6(, 9), then HR and last conv
    last = 3 * int(math.log2(scale)) + 4
    assert {"model.1.sub.2.weight", "model.3.weight", "model.6.weight", f"model.{last - 2}.weight",
            f"model.{last}.weight", "model.1.sub.1.RDB3.conv5.0.weight"} <= set(state)
    model = load_model(write(state, tmp_path / f"RRDB_ESRGAN_x{scale}.pth", container))
    assert type(model) is RRDBNet and model.config["scale"] == scale and model.config["num_blocks"] == 2
    assert_matches(model, oracle, X)
    if container == "pth":
        assert_round_trips(model, tmp_path, X)


@pytest.mark.parametrize("make,name", [
    (lambda: OldESRGAN(1), "1x_community.pth"), (lambda: OldESRGAN(2), "2x.pth"),
    (lambda: NewArchRRDBNet(2), "BSRGANx2.pth")], ids=["old-x1", "old-x2", "bsrgan-x2"])
def test_plain_x1_x2_rrdbnets(tmp_path, make, name):
    """1x / 2x RRDBNets without Real-ESRGAN's pixel-unshuffle (the community 1x ESRGAN models,
    BSRGANx2): 0 / 1 upsampling convs, any input size, tiles like the whole image."""
    from fastsr.pipeline.memory import upscale_image

    oracle = randomize(make(), seed=16)
    torch.save(oracle.state_dict(), tmp_path / name)
    model = load_model(tmp_path / name)
    scale = 1 if name.startswith("1x") else 2
    assert type(model) is RRDBNet and model.config["scale"] == scale and model.config["unshuffle"] == 1
    assert model.input_alignment == 1
    assert_matches(model, oracle, torch.rand(1, 3, 13, 11))
    assert_round_trips(model, tmp_path, X)
    x = torch.rand(1, 3, 29, 23)
    with torch.no_grad(), fastsr.use_backend("torch"):
        ref64 = copy.deepcopy(model).double()(x.double())
        whole = model(x)
        tiled = upscale_image(x, copy.deepcopy(model), tile=8, backend="torch", border="zero")
    assert_within_rule("tiled", tiled, ref64, whole, torch.float32)


def test_original_esrgan_layout_of_an_unshuffled_x2(tmp_path):
    oracle = randomize(OldESRGAN(2, unshuffle=2), seed=15)
    torch.save(oracle.state_dict(), tmp_path / "x2.pth")
    model = load_model(tmp_path / "x2.pth")
    assert model.config["scale"] == 2 and model.config["in_channels"] == 3
    assert_matches(model, oracle, torch.rand(1, 3, 14, 10))


@CONTAINERS
def test_bsrgan_new_architecture(tmp_path, container):
    oracle = randomize(NewArchRRDBNet(4), seed=20)
    path = write(oracle.state_dict(), tmp_path / "BSRGAN.pth", container)
    assert detect_format(oracle.state_dict()) == "esrgan_new"  # never BasicSR's MSRResNet
    model = load_model(path)
    assert type(model) is RRDBNet and model.config["scale"] == 4
    assert_matches(model, oracle, X)


def test_msrresnet_is_still_detected_as_msrresnet():
    from fastsr.models.variants import MSRResNet

    state = {k.replace(".conv.", ".", 1): v for k, v in MSRResNet(4, 2, C).state_dict().items()}
    assert detect_format(state) == "basicsr"


# ------------------------------------------------------------------------------------------------
# SRVGGNetCompact


@CONTAINERS
@pytest.mark.parametrize("num_conv,scale", [(2, 4), (3, 2)])
def test_realesrgan_compact(tmp_path, container, num_conv, scale):
    oracle = randomize(RealESRGANCompact(num_conv, scale), seed=30 + scale)
    model = load_model(write(oracle.state_dict(), tmp_path / "realesr-general-x4v3.pth", container))
    assert type(model) is SRVGGNetCompact
    assert model.config == {"arch": "srvggnet_compact", "scale": scale, "num_convs": num_conv, "channels": C,
                            "in_channels": 3, "out_channels": 3}
    assert_matches(model, oracle, X)
    if container == "pth":
        assert_round_trips(model, tmp_path, X)


@pytest.mark.parametrize("num_conv", [16, 32])  # realesr-animevideov3, realesr-general-x4v3
def test_compact_full_sizes_convert(num_conv):
    state = RealESRGANCompact(num_conv, 4, c=64).state_dict()
    model = convert_checkpoint(state, "realesr.pth")
    assert model.config["num_convs"] == num_conv and model.config["channels"] == 64
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in state.values())


def test_compact_without_prelu_weights_is_refused(tmp_path):
    state = RealESRGANCompact(2, 4, act="relu").state_dict()
    torch.save(state, tmp_path / "relu.pth")
    one_line_error(tmp_path / "relu.pth", r"SRVGGNetCompact checkpoint: no PReLU weights .*ReLU or LeakyReLU")


# ------------------------------------------------------------------------------------------------
# SPAN


def test_conv3xc_merge_equals_the_training_forward():
    layer = randomize(Conv3XC(5, 7), seed=40).double()
    x = torch.randn(2, 5, 9, 6, dtype=torch.float64)
    weight, bias = merge_conv3xc(layer.sk.weight, layer.sk.bias, [c.weight for c in layer.conv],
                                 [c.bias for c in layer.conv])
    assert weight.shape == (7, 5, 3, 3) and weight.dtype == torch.float64
    with torch.no_grad():
        # float64 against float64: stronger than the rule, whose atol is 1e-12 x the largest |value|.
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), layer(x), rtol=1e-12, atol=1e-12)
    # fp16 weights are merged in float64 and kept at float32
    half = [t.half() for t in (layer.sk.weight, layer.sk.bias)]
    assert merge_conv3xc(*half, [c.weight.half() for c in layer.conv], [c.bias.half() for c in layer.conv])[0].dtype \
        == torch.float32


@CONTAINERS
@pytest.mark.parametrize("norm", [True, False])
def test_span_loads_reparameterised(tmp_path, container, norm):
    oracle = span_oracle(4, norm, seed=41)
    state = oracle.state_dict()
    for key in state:  # a training checkpoint's eval_conv can be stale: it must not be read
        if ".eval_conv." in key:
            state[key] = torch.full_like(state[key], 1e3)
    assert ("no_norm" in state) is not norm
    model = load_model(write(state, tmp_path / "spanx4_ch48.pth", container))
    assert type(model) is SPAN and model.config["norm"] is norm and model.config["scale"] == 4
    assert not [k for k in model.state_dict() if "sk" in k or "eval_conv" in k]  # one conv per Conv3XC
    assert_matches(model, oracle, X)
    if container == "pth":
        assert_round_trips(model, tmp_path, X)


def test_span_tiles_like_the_whole_image():
    """Tiled upscaling reads SPAN's receptive field from its layers (conv_2 registered before conv_cat)."""
    from fastsr.pipeline.memory import upscale_image
    from fastsr.tiling import receptive_field

    model = convert_checkpoint(span_oracle(4, seed=45).state_dict(), "span.pth")
    assert receptive_field(model) == 1 + 6 * 3 + 1 + 1  # conv_1, the blocks, conv_2, upsampler (conv_cat is 1x1)
    x = torch.rand(1, 3, 40, 36)
    with torch.no_grad(), fastsr.use_backend("torch"):
        ref64 = copy.deepcopy(model).double()(x.double())
        whole = model(x)  # before upscale_image optimizes the model in place
        tiled = upscale_image(x, model, tile=16, backend="torch", border="zero")  # the plain model's borders
        assert_within_rule("tiled", tiled, ref64, whole, torch.float32)


def test_span_without_eval_conv_and_x2(tmp_path):
    oracle = span_oracle(2, seed=42)
    state = {k: v for k, v in oracle.state_dict().items() if ".eval_conv." not in k}
    torch.save(state, tmp_path / "span_x2.pth")
    model = load_model(tmp_path / "span_x2.pth")
    assert model.config["scale"] == 2
    assert_matches(model, oracle, X)


def test_span_with_an_incomplete_conv3xc(tmp_path):
    state = span_oracle(4, seed=43).state_dict()
    del state["block_3.c2_r.conv.1.bias"]
    torch.save(state, tmp_path / "span.pth")
    one_line_error(tmp_path / "span.pth", r"SPAN checkpoint: block_3\.c2_r lacks conv\.1\.bias")


def test_convert_command_on_span(tmp_path, capsys):
    oracle = span_oracle(4, seed=44)
    src, dst = tmp_path / "span.pth", tmp_path / "span.safetensors"
    torch.save(oracle.state_dict(), src)
    assert cli_main(["convert", str(src), str(dst)]) == 0
    assert "arch=span" in capsys.readouterr().out
    model = load_model(dst)
    assert type(model) is SPAN
    assert_matches(model, oracle, X)


# ------------------------------------------------------------------------------------------------
# Unknown and partial checkpoints


def test_partial_x4plus_names_the_closest_format_and_its_missing_keys(tmp_path):
    state = randomize(BasicSRRRDBNet(4), seed=50).state_dict()
    del state["conv_body.weight"], state["conv_body.bias"]
    torch.save({"params_ema": state}, tmp_path / "RealESRGAN_x4plus.pth")
    message = one_line_error(tmp_path / "RealESRGAN_x4plus.pth", "unknown checkpoint format")
    assert "closest: BasicSR/Real-ESRGAN RRDBNet (has conv_first.weight, body.0.rdb1.conv1.weight, " \
           "conv_last.weight; lacks conv_body.weight)" in message
    assert "body (60)" in message and "conv_first (2)" in message  # what it found: prefixes and counts


def test_partial_bsrgan_is_not_taken_for_msrresnet(tmp_path):
    state = randomize(NewArchRRDBNet(4), seed=51).state_dict()
    del state["trunk_conv.weight"]
    torch.save(state, tmp_path / "BSRGAN.pth")
    one_line_error(tmp_path / "BSRGAN.pth", r"closest: BSRGAN/RealSR/ESRGAN new-architecture RRDBNet \(has "
                                            r"conv_first\.weight, RRDB_trunk.0.RDB1.conv1.weight, conv_last\.weight; "
                                            r"lacks trunk_conv\.weight\)")


def test_unrelated_keys(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # as if not installed: import fails
    torch.save({"encoder.weight": torch.rand(3), "decoder.bias": torch.rand(3)}, tmp_path / "other.pth")
    message = one_line_error(tmp_path / "other.pth", "unknown checkpoint format: 2 tensors under encoder "
                                                     r"\(1\), decoder \(1\); keys decoder.bias, encoder.weight; it has "
                                                     "none of the identifying keys of a known format")
    assert "SPAN (conv_1.sk.weight" in message and "pip install --no-deps spandrel" in message


@pytest.mark.parametrize("oracle,match", [
    (lambda: NewArchRRDBNet(16), r"BSRGAN/RealSR/ESRGAN new-architecture checkpoint: 4 upsampling convs"),
    (lambda: OldESRGAN(4, plus=True), r"original ESRGAN checkpoint: ESRGAN\+"),
])
def test_variants_fastsr_does_not_build(tmp_path, monkeypatch, oracle, match):
    monkeypatch.setitem(sys.modules, "spandrel", None)
    torch.save(oracle().state_dict(), tmp_path / "variant.pth")
    with pytest.raises(NoNativeFormatError, match=match + ".*pip install --no-deps spandrel"):
        load_model(tmp_path / "variant.pth")


# ------------------------------------------------------------------------------------------------
# spandrel for everything else (a fake module: spandrel itself would pull torchvision)


class FakeSpandrel:
    """The part of spandrel's API fastsr uses: ModelLoader().load_from_state_dict -> descriptor.model."""

    class UnsupportedModelError(Exception):
        pass

    def __init__(self, build) -> None:
        self.states = []
        fake = self

        class ModelLoader:
            def load_from_state_dict(self, state):
                fake.states.append(state)
                if build is None:
                    raise fake.UnsupportedModelError("Unsupported model architecture.")
                model = build()
                model.load_state_dict(state)
                return types.SimpleNamespace(model=model.train(), scale=2)

        self.module = types.ModuleType("spandrel")
        self.module.ModelLoader = ModelLoader
        self.module.UnsupportedModelError = self.UnsupportedModelError


def install_fake_spandrel(monkeypatch, build) -> FakeSpandrel:
    fake = FakeSpandrel(build)
    monkeypatch.setitem(sys.modules, "spandrel", fake.module)
    return fake


def test_spandrel_loads_what_fastsr_does_not_build(tmp_path, monkeypatch, capsys):
    oracle = randomize(NewArchRRDBNet(16), seed=60)  # four upsampling convs: x16
    fake = install_fake_spandrel(monkeypatch, lambda: NewArchRRDBNet(16))
    state = {f"module.{k}": v for k, v in oracle.state_dict().items()}
    torch.save({"params_ema": state}, tmp_path / "BSRGANx16.pth")
    model = load_model(tmp_path / "BSRGANx16.pth")
    assert type(model) is NewArchRRDBNet and not model.training
    assert set(fake.states[0]) == set(oracle.state_dict())  # the unwrapped tensors, prefixes removed
    with torch.no_grad():
        torch.testing.assert_close(model(X), oracle(X), rtol=0, atol=0)
    # a spandrel module has no fastsr model file
    assert cli_main(["convert", str(tmp_path / "BSRGANx16.pth"), str(tmp_path / "out.safetensors")]) == 2
    assert "spandrel loaded it as NewArchRRDBNet" in capsys.readouterr().err


def test_spandrel_gets_unknown_formats_but_never_native_ones(tmp_path, monkeypatch):
    class Other(nn.Module):  # an architecture fastsr has no format for
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Conv2d(3, 3, 3, padding=1)

    fake = install_fake_spandrel(monkeypatch, Other)
    save_file({k: v.contiguous() for k, v in Other().state_dict().items()}, str(tmp_path / "other.safetensors"))
    assert type(load_model(tmp_path / "other.safetensors")) is Other
    torch.save(randomize(BasicSRRRDBNet(4), seed=61).state_dict(), tmp_path / "x4plus.pth")
    assert type(load_model(tmp_path / "x4plus.pth")) is RRDBNet
    assert len(fake.states) == 1


def test_spandrel_failing_too(tmp_path, monkeypatch):
    install_fake_spandrel(monkeypatch, None)
    torch.save({"encoder.weight": torch.rand(3)}, tmp_path / "other.pth")
    one_line_error(tmp_path / "other.pth", "unknown checkpoint format.*; spandrel cannot load it either: "
                                           "Unsupported model architecture")
