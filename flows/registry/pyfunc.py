"""The served generator, re-exported from flows.package.pyfunc (its home, in the shared
layer beside the package format).

Kept because models registered before the move carry a models-from-code file that says
``from flows.registry.pyfunc import GanflowGenerator``: MLflow runs that file whenever it
loads such a model, so this import must keep working for as long as those models are
served. New models are logged with flows.package.pyfunc_model; new code imports from
flows.package.pyfunc."""

from flows.package.pyfunc import (
    DIRECTIONS,
    FORMATS,
    MAX_ARRAY_VALUES,
    MAX_SAMPLES,
    PACKAGE_ARTIFACT,
    BadRequest,
    GanflowGenerator,
    to_png,
)

__all__ = [
    "DIRECTIONS",
    "FORMATS",
    "MAX_ARRAY_VALUES",
    "MAX_SAMPLES",
    "PACKAGE_ARTIFACT",
    "BadRequest",
    "GanflowGenerator",
    "to_png",
]
