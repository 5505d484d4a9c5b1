"""OpenELM on Apple Silicon: the MLX model, loading, and generation."""

__version__ = "0.1.0"

from .config import OpenELMConfig
from .errors import OpenELMError
from .generate import GenerationOptions, generate, stream_generate
from .loader import load
from .model import Model

__all__ = [
    "OpenELMConfig",
    "Model",
    "load",
    "generate",
    "stream_generate",
    "GenerationOptions",
    "OpenELMError",
    "__version__",
]
