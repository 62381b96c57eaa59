"""Feature sources: what the kernels compare, one module each, found by name in a registry.

The interface and the registry are in :mod:`.base` (re-exported here). The built-in sources register themselves
when this package is imported, in this order (which fixes the kernel names' order):

- :mod:`.tokens`: the encoders' own tokens, with learned projections: "global", "mid", "local";
- :mod:`.concept`: an ImageNet classifier's classes as a bridge into the sentence encoder's space: "concept",
  "concept_class", "concept_local";
- :mod:`.colour`: colour names of the image's cells against the caption's colour words: "colour";
- :mod:`.scene_text`: words read in the image by OCR against the caption's words: "scene_text";
- :mod:`.person`: frontal faces against captions that name a person: "person".
"""

# Registration order is kernel order: the encoders' tokens first, then the fixed sources.
from . import tokens  # noqa: F401, I001
from . import concept, colour, scene_text, person  # noqa: F401, I001
from .base import (
    FeatureSource,
    SourceContext,
    SourceEmbeddings,
    available_features,
    build_sources,
    register_source,
    source_classes,
)

__all__ = [
    "FeatureSource",
    "SourceContext",
    "SourceEmbeddings",
    "available_features",
    "build_sources",
    "register_source",
    "source_classes",
]
