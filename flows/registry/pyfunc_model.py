"""MLflow's models-from-code file as it was before the served class moved to flows.package;
flows.package.pyfunc_model is the one logged now (flows.package.MODEL_CODE).

Kept for whatever still names this path when it logs a model (a script written against an
earlier ganflow); it does the same as the new file. Models already registered carry their
own copy of the old file, whose import flows.registry.pyfunc keeps answering."""

from mlflow.models import set_model

from flows.package.pyfunc import GanflowGenerator

set_model(GanflowGenerator())
