"""moyu: measure and exploit massive over-activation (dynamic activation) in LLMs."""
from .errors import MoyuError
from .models import load, list_models, DEFAULT_MODEL

__version__ = "0.1.0"
__all__ = ["MoyuError", "load", "list_models", "DEFAULT_MODEL"]
