"""MLflow's models-from-code file for ganflow generators (see flows.package.pyfunc).

Logged with every generator (flows.tracking.log_generator, as flows.package.MODEL_CODE) and
run by MLflow when it loads the model: the class comes from the installed ganflow code, the
weights from the model's package artifact. Nothing is unpickled."""

from mlflow.models import set_model

from flows.package.pyfunc import GanflowGenerator

set_model(GanflowGenerator())
