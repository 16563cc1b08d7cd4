"""Model-from-code script: MLflow copies this file into every logged medattn model and runs it
on load (and once when logging). It must only declare the model; it is not imported by medattn.
"""

import mlflow.models

from medattn.registry.pyfunc import MedattnPyfunc

mlflow.models.set_model(MedattnPyfunc())
