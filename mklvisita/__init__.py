"""MKL-VisITA: image-text matching with multi-kernel learning, a vision transformer and two-way fusion."""

from .config import MKLVisITAConfig
from .inputs import InvalidCaptionError, InvalidImageError
from .model import CheckpointError, MKLVisITA

__all__ = ["MKLVisITA", "MKLVisITAConfig", "Matcher", "CheckpointError", "InvalidImageError", "InvalidCaptionError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Matcher pulls in explanations and retrieval; import it lazily so `import mklvisita` stays light.
    if name == "Matcher":
        from .matcher import Matcher

        return Matcher
    raise AttributeError(name)
