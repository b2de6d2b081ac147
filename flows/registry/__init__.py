"""Model registry and promotion on MLflow.

package (the weights-only generator package) -> models (register, resolve, load) ->
promote (the fair comparison, the lock, rollback).
"""

from flows.registry.models import load_registered, parse_model_ref, register
from flows.registry.package import RegistryError, load_package, model_name, package_generator
from flows.registry.promote import Decision, promote, promotion_lock, rollback

__all__ = [
    "Decision",
    "RegistryError",
    "load_package",
    "load_registered",
    "model_name",
    "package_generator",
    "parse_model_ref",
    "promote",
    "promotion_lock",
    "register",
    "rollback",
]
