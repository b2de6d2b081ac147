"""The generator package format and the served model, in the shared layer.

- format (re-exported here): the weights-only package (safetensors + JSON) that every
  training run logs inside its MLflow model, its names and format marker, ``write_package``,
  ``load_package``, ``serving_signature`` and the path of the models-from-code file;
- pyfunc: ``GanflowGenerator``, the MLflow ``PythonModel`` served over a package (imported
  on its own: it imports MLflow);
- pyfunc_model: MLflow's models-from-code file, shipped with every logged model.

flows.tracking writes and logs packages, flows.registry registers, loads and serves them;
both import from here, so the format has one home below both.
"""

from flows.package.format import (
    FORMAT_VERSION,
    MAX_SAMPLES,
    META_FILE,
    MODEL_CODE,
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_NAME,
    PACKAGE_ARTIFACT,
    PIP_REQUIREMENTS,
    RegistryError,
    generator_keys,
    load_package,
    serving_signature,
    write_package,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_SAMPLES",
    "META_FILE",
    "MODEL_CODE",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "MODEL_NAME",
    "PACKAGE_ARTIFACT",
    "PIP_REQUIREMENTS",
    "RegistryError",
    "generator_keys",
    "load_package",
    "serving_signature",
    "write_package",
]
