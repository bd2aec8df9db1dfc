"""The leadscore training job: features, tuning, ONNX export, MLflow registry."""
