"""Registers a copy of a trained model whose ONNX graph only takes batches of one lead.

A classic export bug: the graph loads, and scores a single lead, but every
batch of two or more fails inside ONNX Runtime. Tests use it as a challenger
that fails on leads.

usage: static_batch_version.py MLFLOW_URL MODEL_NAME TRAINED_DIR OUT_DIR
prints the new version number on its last line (MLflow prints its own lines before it).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import mlflow
import onnx
from mlflow.tracking import MlflowClient


def main() -> None:
    uri, name, trained, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(trained / "model.onnx"))
    dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    onnx_bytes = graph.SerializeToString()
    (out / "model.onnx").write_bytes(onnx_bytes)
    metadata = json.loads((trained / "metadata.json").read_text())
    metadata["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    mlflow.set_experiment(name)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(out / "model.onnx"), artifact_path="model")
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags={"onnx_sha256": metadata["onnx_sha256"]})
        metadata["version"] = str(mv.version)
        (out / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        mlflow.log_artifact(str(out / "metadata.json"), artifact_path="model")
    print(mv.version)


if __name__ == "__main__":
    main()
