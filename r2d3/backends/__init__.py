"""3D-native generators behind one protocol (see :mod:`r2d3.backends.base`)."""

from r2d3.backends.base import Backend, WeightsError, available_backends, load_backend, register_backend
from r2d3.backends.diffsplat import DiffSplatBackend
from r2d3.backends.shap_e import ShapEBackend
from r2d3.backends.text import PromptEmbeds, TextEncoder, WordTokenizer
from r2d3.backends.tiny import TinySplatBackend, TinySplatDenoiser

__all__ = [
    "Backend",
    "DiffSplatBackend",
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
