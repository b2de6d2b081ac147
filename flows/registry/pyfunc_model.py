"""MLflow's models-from-code file for ganflow generators (see flows.registry.pyfunc).

Logged with every generator (flows.tracking.log_generator) and run by MLflow when it loads
the model: the class comes from the installed ganflow code, the weights from the model's
package artifact. Nothing is unpickled."""

from mlflow.models import set_model

from flows.registry.pyfunc import GanflowGenerator

set_model(GanflowGenerator())
