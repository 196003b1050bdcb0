"""SRGAN models and their checkpoint files."""

from .checkpoint import load_model, save_model
from .discriminator import Discriminator
from .srresnet import SRResNet

__all__ = ["SRResNet", "Discriminator", "load_model", "save_model"]
