"""moyu: measure and exploit massive over-activation (dynamic activation) in LLMs."""
from .errors import MoyuError
from .models import load, list_models, DEFAULT_MODEL
from .analysis import analyze
from .methods import calibrate, sparsify, METHODS
from .profile import Profile

__version__ = "0.1.0"
__all__ = ["MoyuError", "load", "list_models", "DEFAULT_MODEL", "calibrate", "sparsify", "METHODS", "Profile", "analyze"]
