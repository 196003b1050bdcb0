"""Making a model fast for inference: ``fastsr.fuse(model)`` and ``fastsr.optimize(model)``.

* :func:`optimize` (fastsr's own models, in place): every eval-mode BatchNorm of a
  :class:`fastsr.nn.ConvPReLU` is folded into its convolution for good, so each layer is one
  fused ``conv2d_prelu`` call with no per-call folding work.
* :func:`fuse` (any SRGAN-style PyTorch model, as a copy): its conv patterns become fastsr ops.

Both leave the model in eval mode and channels_last (the layout the CPU convolutions and the
``cpp`` epilogues are fastest in), converting an NCHW input once at the model's entry
(:func:`channels_last_at_entry`), so callers need not care about memory formats.

The patterns of :func:`fuse`, each replaced by one :class:`FusedConv2d` (a :class:`fastsr.nn.ConvPReLU`, i.e. one
``fastsr.functional.conv2d_prelu`` call):

    [nearest x2] -> Conv2d -> [BatchNorm2d] -> [PixelShuffle] -> [PReLU | ReLU | LeakyReLU] -> [* c] -> [+ skip]

or by one :class:`fastsr.nn.ConvSiLU` (one ``conv2d_silu`` call): Conv2d -> [BatchNorm2d] -> SiLU.

Conv2d must be stride 1, dilation 1, groups 1, zero 'same' padding with an odd square kernel.
BatchNorm is folded with its running statistics (eval-mode semantics: the fused model is for
inference and is returned in eval mode). A multiplication by a positive constant (EDSR/BasicSR's
``res_scale``) is folded into the weights. A nearest-neighbour x2 upsampling in front of a 3x3
conv (ESRGAN's upsampling; ``F.interpolate`` or ``nn.Upsample``) becomes part of the conv: an LR
conv to 4x the channels with a pixel shuffle (:func:`fastsr.nn.fold_nearest_upsampling`), when
the pattern has no pixel shuffle of its own. Every other conv runs as a plain fused conv.

How the model is read:
* torch.fx, where the model (or a submodule) traces: any forward code, including skip additions
  (``x + y``, ``torch.add``, ``+=``).
* A module walk where tracing fails (data-dependent control flow, asserts on shapes): children
  are fused recursively, and in ``nn.Sequential`` containers consecutive layers that form a
  pattern are fused (skip additions written in such a forward stay as they are). A plain
  ``nn.Sequential`` reached by the walk is always fused in place, so it stays indexable.
"""

from __future__ import annotations

import copy
import logging
import numbers
import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import ConvPReLU, ConvSiLU, fold_batchnorm, fold_nearest_upsampling

log = logging.getLogger(__name__)


class FusedConv2d(ConvPReLU):
    """A :class:`~fastsr.nn.ConvPReLU` made by :func:`fuse` from a model's layers.

    ``forward(x, residual)`` also accepts a residual that does not have the output's exact shape
    and dtype (a broadcast addition in the original model): then the addition runs unfused.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            r = self.shuffle
            shape = (x.shape[0], self.conv.out_channels // (r * r), x.shape[2] * r, x.shape[3] * r)
            fits = (isinstance(residual, torch.Tensor) and tuple(residual.shape) == shape
                    and residual.dtype == x.dtype and residual.device == x.device)
            if not fits:
                return super().forward(x) + residual
        return super().forward(x, residual)


def _plain_conv(m: nn.Module) -> bool:
    """A Conv2d that conv2d_prelu computes exactly: stride 1, 'same' zero padding, odd square kernel."""
    if type(m) is not nn.Conv2d or m._forward_hooks or m._forward_pre_hooks:
        return False
    k = m.kernel_size
    same = m.padding == "same" or m.padding == (k[0] // 2, k[1] // 2)
    return (k[0] == k[1] and k[0] % 2 == 1 and same and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros")


def _foldable_bn(m: nn.Module, channels: int) -> bool:
    """A BatchNorm2d whose eval-mode output is an affine map of its input (it has running stats)."""
    return (type(m) is nn.BatchNorm2d and not m._forward_hooks and not m._forward_pre_hooks
            and m.running_mean is not None and m.num_features == channels)


class _Chain:
    """The layers of one pattern, collected before the fused module is built."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.bn: nn.BatchNorm2d | None = None
        self.shuffle = 1
        self.activation: str | None = None
        self.slope: torch.Tensor | None = None  # PReLU weights
        self.negative_slope = 0.0  # LeakyReLU
        self.multiplier = 1.0
        self.nearest_x2 = False  # a nearest x2 upsampling in front, folded into the conv

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels // (self.shuffle * self.shuffle)

    def set_activation(self, kind: str, slope: torch.Tensor | float) -> bool:
        if kind == "prelu" and slope.numel() not in (1, self.out_channels):
            return False
        if kind == "silu" and self.shuffle != 1:  # conv2d_silu has no pixel shuffle
            return False
        self.activation = kind
        if kind == "prelu":
            self.slope = slope
        else:
            self.negative_slope = float(slope)
        return True

    @torch.no_grad()
    def build(self) -> FusedConv2d | ConvSiLU:
        conv = self.conv
        weight = conv.weight.detach().double()
        bias = None if conv.bias is None else conv.bias.detach().double()
        if self.bn is not None:
            weight, bias = fold_batchnorm(weight, bias, self.bn)
        # act(c * z) == c * act(z) for c > 0 and the PReLU family, so the constant goes into the conv.
        weight = weight * self.multiplier
        bias = None if bias is None else bias * self.multiplier
        shuffle = self.shuffle
        if self.nearest_x2:
            weight, bias = fold_nearest_upsampling(weight, bias)
            shuffle = 2
        if self.activation == "silu":
            fused = ConvSiLU(conv.in_channels, weight.shape[0], conv.kernel_size[0], bias=bias is not None)
            fused.to(conv.weight.device, conv.weight.dtype)
            fused.conv.weight.copy_(weight)
            if bias is not None:
                fused.conv.bias.copy_(bias)
            return fused.eval()
        num_slopes = 1 if self.slope is None else self.slope.numel()
        fused = FusedConv2d(conv.in_channels, weight.shape[0], conv.kernel_size[0], bias=bias is not None,
                            activation=self.activation, shuffle=shuffle, num_slopes=num_slopes,
                            negative_slope=self.negative_slope).to(conv.weight.device)
        fused.conv.to(conv.weight.dtype)
        fused.conv.weight.copy_(weight)
        if bias is not None:
            fused.conv.bias.copy_(bias)
        if self.activation == "prelu":
            fused.slope = nn.Parameter(self.slope.detach().clone().reshape(-1))
        return fused.eval()


# ---------------------------------------------------------------------------------------------
# torch.fx path


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # fastsr's own layers are already fused; their forward dispatches to backends fx cannot trace.
        return isinstance(m, (ConvPReLU, ConvSiLU)) or super().is_leaf_module(m, qualname)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_LEAKY_FUNCTIONS = (F.leaky_relu, F.leaky_relu_)
_SILU_FUNCTIONS = (F.silu, torch.nn.functional.silu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_call(node: fx.Node | None, functions: tuple, methods: tuple[str, ...]) -> bool:
    if node is None:
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _other_operand(node: fx.Node, prev: fx.Node) -> object:
    """For a binary node ``op(prev, other)`` / ``op(other, prev)`` without extra options: ``other``."""
    if len(node.args) != 2 or node.kwargs or (node.args[0] is prev) == (node.args[1] is prev):
        return None
    return node.args[1] if node.args[0] is prev else node.args[0]


def _match_activation(node: fx.Node, prev: fx.Node, modules: dict, chain: _Chain) -> bool:
    if node.op == "call_module" and node.args[:1] == (prev,) and len(node.args) == 1:
        return _activation_module(modules[node.target], chain)
    if not node.args or node.args[0] is not prev:
        return False
    if _is_call(node, _RELU_FUNCTIONS, ("relu", "relu_")):
        return len(node.args) <= 2 and chain.set_activation("relu", 0.0)  # (x) or (x, inplace)
    if _is_call(node, _SILU_FUNCTIONS, ()):
        return len(node.args) <= 2 and not node.kwargs.keys() - {"inplace"} and chain.set_activation("silu", 0.0)
    if _is_call(node, _LEAKY_FUNCTIONS, ()):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return isinstance(slope, numbers.Real) and chain.set_activation("leaky_relu", slope)
    return False


def _nearest_x2_module(m: nn.Module) -> bool:
    return (type(m) is nn.Upsample and m.mode == "nearest" and m.size is None
            and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)) and not m._forward_hooks and not m._forward_pre_hooks)


def _nearest_x2_node(node: object, modules: dict, calls: Counter) -> bool:
    """Whether fx node ``node`` is a nearest x2 upsampling of one tensor (F.interpolate or nn.Upsample)."""
    if not isinstance(node, fx.Node) or len(node.args) != 1:
        return False
    if node.op == "call_module":
        return calls[node.target] == 1 and not node.kwargs and _nearest_x2_module(modules[node.target])
    if not _is_call(node, (F.interpolate, F.upsample), ()):
        return False
    kw = dict(node.kwargs)
    ok = kw.pop("scale_factor", None) in (2, 2.0, (2, 2), (2.0, 2.0)) and kw.pop("mode", "nearest") == "nearest"
    return ok and all(v in (None, False) for v in kw.values())


def _match_chain(conv_node: fx.Node, modules: dict, calls: Counter) -> tuple[_Chain, list[fx.Node], object]:
    """Grow a pattern from a conv node; returns the chain, its nodes (conv first) and the residual."""
    chain = _Chain(modules[conv_node.target])
    nodes = [conv_node]
    node = _sole_user(conv_node)
    if (node is not None and node.op == "call_module" and node.args == (conv_node,) and calls[node.target] == 1
            and _foldable_bn(modules[node.target], chain.conv.out_channels)):
        chain.bn = modules[node.target]
        nodes.append(node)
        node = _sole_user(node)
    if node is not None and node.args[:1] == (nodes[-1],):
        r = None
        if node.op == "call_module" and type(modules[node.target]) is nn.PixelShuffle and len(node.args) == 1:
            r = modules[node.target].upscale_factor
        elif _is_call(node, (F.pixel_shuffle, torch.pixel_shuffle), ()) and len(node.args) == 2:
            r = node.args[1]
        if isinstance(r, int) and r >= 1 and chain.conv.out_channels % (r * r) == 0:
            chain.shuffle = r
            nodes.append(node)
            node = _sole_user(node)
    if node is not None and _match_activation(node, nodes[-1], modules, chain):
        nodes.append(node)
        node = _sole_user(node)
    if chain.activation == "silu":  # silu(c z) != c silu(z), and conv2d_silu adds no residual
        return chain, nodes, None
    if node is not None and _is_call(node, _MUL_FUNCTIONS, ("mul", "mul_")):
        c = _other_operand(node, nodes[-1])
        if isinstance(c, numbers.Real) and not isinstance(c, bool) and (c > 0 or chain.activation is None):
            chain.multiplier = float(c)
            nodes.append(node)
            node = _sole_user(node)
    residual = None
    if node is not None and _is_call(node, _ADD_FUNCTIONS, ("add", "add_")):
        other = _other_operand(node, nodes[-1])
        # an in-place add (``+=``, add_) must update the chain's output: one that updates the skip
        # tensor changes a value other code may read afterwards
        in_place = node.target in (operator.iadd, "add_")
        in_place_on_skip = in_place and node.args[0] is not nodes[-1]
        if isinstance(other, fx.Node) and not in_place_on_skip:
            residual = other
            nodes.append(node)
    return chain, nodes, residual


def _fuse_graph(gm: fx.GraphModule) -> int:
    """Replace every pattern in ``gm``'s graph by a FusedConv2d; returns how many."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    # Parameters the forward reads directly (``self.conv.weight``): such a conv keeps its place.
    read_attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    erased: set[fx.Node] = set()
    count = 0
    for node in list(gm.graph.nodes):
        if node in erased or node.op != "call_module" or calls[node.target] != 1:
            continue
        if any(attr.startswith(node.target + ".") for attr in read_attrs):
            continue
        if not _plain_conv(modules[node.target]) or len(node.args) != 1 or node.kwargs:
            continue
        chain, nodes, residual = _match_chain(node, modules, calls)
        source = node.args[0]
        upsampling = (source if chain.shuffle == 1 and chain.conv.kernel_size == (3, 3) and chain.activation != "silu"
                      else None)
        if _nearest_x2_node(upsampling, modules, calls) and _sole_user(upsampling) is node:
            chain.nearest_x2, source = True, upsampling.args[0]
            nodes.insert(0, upsampling)
        fused = chain.build()
        gm.add_submodule(node.target, fused)  # takes the conv's place in the module tree
        args = (source,) if residual is None else (source, residual)
        with gm.graph.inserting_before(nodes[-1]):
            new = gm.graph.call_module(node.target, args)
        nodes[-1].replace_all_uses_with(new)
        for old in reversed(nodes):
            gm.graph.erase_node(old)
            erased.add(old)
        count += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return count


# ---------------------------------------------------------------------------------------------
# module-walk path


def _activation_module(m: nn.Module, chain: _Chain) -> bool:
    """Record ``m`` as the chain's activation if it is a hook-free PReLU, ReLU or LeakyReLU."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    if type(m) is nn.PReLU:
        return chain.set_activation("prelu", m.weight)
    if type(m) is nn.ReLU:
        return chain.set_activation("relu", 0.0)
    if type(m) is nn.LeakyReLU:
        return chain.set_activation("leaky_relu", m.negative_slope)
    if type(m) is nn.SiLU:
        return chain.set_activation("silu", 0.0)
    return False


def _fuse_sequential(seq: nn.Sequential) -> int:
    """Fuse runs of Conv2d, [BatchNorm2d], [PixelShuffle], [activation] inside ``seq``; keeps indices
    (the fused layers' other slots become ``nn.Identity``)."""
    layers = list(seq)
    count = 0
    i = 0
    while i < len(layers):
        if not _plain_conv(layers[i]):
            i += 1
            continue
        chain = _Chain(layers[i])
        upsampled = i > 0 and _nearest_x2_module(layers[i - 1]) and chain.conv.kernel_size == (3, 3)
        j = i + 1
        if j < len(layers) and _foldable_bn(layers[j], chain.conv.out_channels):
            chain.bn = layers[j]
            j += 1
        if j < len(layers) and type(layers[j]) is nn.PixelShuffle:
            r = layers[j].upscale_factor
            if chain.conv.out_channels % (r * r) == 0:
                chain.shuffle = r
                j += 1
        if j < len(layers) and _activation_module(layers[j], chain):
            j += 1
        if upsampled and chain.shuffle == 1 and chain.activation != "silu":
            chain.nearest_x2 = True
            seq[i - 1] = nn.Identity()
        seq[i] = chain.build()
        for k in range(i + 1, j):
            seq[k] = nn.Identity()
        count += 1
        i = j
    return count


def _check_no_lost_updates(graph: fx.Graph) -> None:
    """fx records ``a += b`` on a traced tensor as ``a + b`` bound to the name ``a``; where the
    tensor is also read through another name, the sum goes unused and the trace computes something
    else than the model. An unused operator result is the sign: refuse such a trace."""
    for node in graph.nodes:
        if node.op == "call_function" and not node.users and getattr(node.target, "__module__", None) == "_operator":
            raise ValueError(f"the trace drops the result of {node.format_node()} (an in-place update of an alias?)")


def _fuse_module(m: nn.Module, name: str) -> tuple[nn.Module, int]:
    if isinstance(m, (ConvPReLU, ConvSiLU)):
        return m, 0
    if _plain_conv(m):
        return _Chain(m).build(), 1
    if not any(True for _ in m.children()):
        return m, 0
    count = 0
    if type(m) is nn.Sequential:
        # A plain chain: fusing its layers in place keeps it an indexable nn.Sequential.
        count += _fuse_sequential(m)
    else:
        try:
            gm = fx.GraphModule(m, _Tracer().trace(m), class_name=type(m).__name__)
            _check_no_lost_updates(gm.graph)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
            log.debug("fuse: %s (%s) does not trace (%s); walking its children", name or "model",
                      type(m).__name__, exc)
        else:
            # Keep simple attributes the original class set (e.g. ``scale``) for code that reads them.
            for key, value in vars(m).items():
                if not key.startswith("_") and isinstance(value, (bool, int, float, str, dict, tuple)):
                    if not hasattr(gm, key):
                        setattr(gm, key, value)
            return gm, _fuse_graph(gm)
    for child_name, child in list(m.named_children()):
        new, n = _fuse_module(child, f"{name}.{child_name}" if name else child_name)
        count += n
        if new is not child:
            setattr(m, child_name, new)
    return m, count


def fuse(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose conv patterns run as fastsr fused ops (see module doc).

    The original model is not changed. Outputs equal the original's in eval mode up to float
    rounding (BatchNorm folding reorders a few multiplications). The result is a
    ``torch.fx.GraphModule`` where the model traces, else the model's own class with fused
    children, in channels_last, converting an NCHW input once at its entry. Use it for
    inference, with any backend and under ``torch.compile``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__name__}")
    fused, count = _fuse_module(copy.deepcopy(model).eval(), "")
    log.debug("fuse: %d convolution patterns now run as fastsr ops", count)
    return channels_last_at_entry(fused.eval().to(memory_format=torch.channels_last))


# ---------------------------------------------------------------------------------------------
# fastsr models in place, and the channels_last entry both use


@torch.no_grad()
def optimize(model: nn.Module) -> nn.Module:
    """Fold BatchNorm into the convs of ``model``'s ConvPReLU layers, in place; returns ``model``.

    Uses the BatchNorm running statistics (eval semantics), so outputs in eval mode are unchanged
    up to float rounding. The model is left in eval mode and channels_last; training it again
    afterwards trains the folded convs (there is no BatchNorm any more). Modules that have an
    inference form of their own (``optimize_for_inference()``, e.g. :class:`fastsr.models.RRDBNet`:
    residual scales in the weights, upsampling folded into the following conv) are switched to it.
    """
    for module in list(model.modules()):
        if hasattr(module, "optimize_for_inference"):
            module.optimize_for_inference()
    for module in model.modules():
        if isinstance(module, ConvPReLU) and module.bn is not None:
            weight, bias = fold_batchnorm(module.conv.weight, module.conv.bias, module.bn)
            old = module.conv
            conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                             padding=old.padding, dilation=old.dilation, groups=old.groups, bias=True,
                             device=old.weight.device, dtype=old.weight.dtype)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
            module.conv = conv
            module.bn = None
    return channels_last_at_entry(model.eval().to(memory_format=torch.channels_last))


def _input_to_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def channels_last_at_entry(model: nn.Module) -> nn.Module:
    """Make ``model`` convert a 4-D NCHW input to channels_last once, before its first layer.

    Without it an NCHW input keeps every layer in NCHW (each op's output follows its input's
    format), which on CPU is up to 1.6x slower for the same model. Idempotent; returns ``model``.
    The output is channels_last, as PyTorch's own convolutions give for channels_last weights.
    """
    if not getattr(model, "_fastsr_channels_last_entry", False):
        model.register_forward_pre_hook(_input_to_channels_last)
        model._fastsr_channels_last_entry = True
    return model
