"""SRGAN-family models and their checkpoint files."""

from .checkpoint import load_model, save_model
from .compact import SRVGGNetCompact
from .discriminator import Discriminator
from .rrdbnet import RRDBNet
from .span import SPAN
from .srresnet import SRResNet
from .variants import MSRResNet, PeerSRResNet

__all__ = ["Discriminator", "MSRResNet", "PeerSRResNet", "RRDBNet", "SPAN", "SRResNet", "SRVGGNetCompact",
           "load_model", "save_model"]
