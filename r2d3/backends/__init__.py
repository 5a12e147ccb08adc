"""3D-native generators behind one protocol (see :mod:`r2d3.backends.base`)."""

from r2d3.backends.base import Backend, available_backends, load_backend, register_backend
from r2d3.backends.diffsplat import DiffSplatBackend
from r2d3.backends.diffsplat_sd15 import DiffSplatSD15Backend
from r2d3.backends.shap_e import ShapEBackend
from r2d3.backends.tiny import TinySplatBackend, TinySplatDenoiser
from r2d3.pretrained import WeightsError
from r2d3.text import PromptEmbeds, TextEncoder, WordTokenizer

__all__ = [
    "Backend",
    "DiffSplatBackend",
    "DiffSplatSD15Backend",
    "PromptEmbeds",
    "ShapEBackend",
    "TextEncoder",
    "TinySplatBackend",
    "TinySplatDenoiser",
    "WeightsError",
    "WordTokenizer",
    "available_backends",
    "load_backend",
    "register_backend",
]
