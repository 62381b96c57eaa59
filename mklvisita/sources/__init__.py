"""Feature sources: what kernels compare, beside the encoders' own token levels.

Each module here is one source: the concept bridge (:mod:`.concept`), colour names (:mod:`.colour`), frontal faces
against captions naming a person (:mod:`.person`) and the words written in the image (:mod:`.scene_text`).
"""
