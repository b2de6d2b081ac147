"""Model registry and promotion on MLflow.

package (the registry's names around the weights-only generator package) -> models
(register, resolve, load) -> promote (the fair comparison, the lock, rollback) -> serve
(MLflow's scoring server on a champion). The package format and the served model class
over it live below, in flows.package (pyfunc here only re-exports the class, for models
registered before it moved).
"""

from flows.registry.models import (
    list_models,
    load_generator,
    load_registered,
    load_registered_generator,
    parse_model_ref,
    register,
)
from flows.registry.package import (
    HISTORY_TAG,
    RegistryError,
    load_package,
    model_name,
    package_generator,
)
from flows.registry.promote import (
    ChampionMeasure,
    Decision,
    PromotionLock,
    promote,
    promotion_lock,
    rollback,
)

__all__ = [
    "HISTORY_TAG",
    "ChampionMeasure",
    "Decision",
    "PromotionLock",
    "RegistryError",
    "list_models",
    "load_generator",
    "load_package",
    "load_registered",
    "load_registered_generator",
    "model_name",
    "package_generator",
    "parse_model_ref",
    "promote",
    "promotion_lock",
    "register",
    "rollback",
]
