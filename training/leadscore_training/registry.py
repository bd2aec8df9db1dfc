"""MLflow registry: log the run, register a version, apply the evaluation gate.

Aliases: ``champion`` serves live traffic, ``challenger`` runs in shadow.
A new version becomes ``challenger`` only if its AUC on the same holdout
beats the champion's by ``margin`` (AUC points). With no champion yet, the
first version becomes ``champion``. Either way the decision and its reason
are recorded as version tags (``gate``, ``gate_reason``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

log = logging.getLogger("leadscore.training.registry")


class RegistryError(Exception):
    """MLflow is unreachable or holds something unusable."""


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return mlflow, MlflowClient(tracking_uri=uri)


def champion_auc(client, name: str, hold_df: pd.DataFrame, y_hold: np.ndarray):
    """(version, AUC) of the current champion on this holdout, or None without a champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .features import FeatureSpec
    from .train import onnx_scores

    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=champ.source, dst_path=tmp))
        onnx_bytes = (path / "model.onnx").read_bytes()
        meta = json.loads((path / "metadata.json").read_text())
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if digest != meta.get("onnx_sha256"):
        raise RegistryError(f"champion {name} v{champ.version}: model.onnx checksum {digest} does not match its metadata")
    spec = FeatureSpec.from_json(meta["feature_spec"])
    return champ.version, float(roc_auc_score(y_hold, onnx_scores(onnx_bytes, spec.transform(hold_df))))


def publish(uri: str, name: str, out: Path, metadata: dict, hold_df: pd.DataFrame,
            y_hold: np.ndarray, margin: float) -> dict:
    try:
        mlflow, client = _client(uri)
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="Lead conversion probability (LightGBM -> ONNX)")
        mlflow.set_experiment(name)
        with mlflow.start_run() as run:
            mlflow.log_params(metadata["params"])
            mlflow.log_metrics({k: v for k, v in metadata["metrics"].items() if isinstance(v, (int, float))})
            mlflow.log_dict(metadata["data_window"], "data_window.json")
            mlflow.log_artifact(str(out / "model.onnx"), artifact_path="model")
            source = f"{run.info.artifact_uri}/model"
            mv = client.create_model_version(name, source, run_id=run.info.run_id,
                                             tags={"onnx_sha256": metadata["onnx_sha256"]})
            metadata["version"] = str(mv.version)
            (out / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            mlflow.log_artifact(str(out / "metadata.json"), artifact_path="model")

        new_auc = metadata["metrics"]["validation_auc"]
        current = champion_auc(client, name, hold_df, y_hold)
        if current is None:
            gate, reason = "champion", "no champion yet: the first version becomes champion"
            client.set_registered_model_alias(name, "champion", mv.version)
            champ_auc = None
        else:
            champ_version, champ_auc = current
            if new_auc >= champ_auc + margin:
                gate = "challenger"
                reason = (f"AUC {new_auc:.4f} beats champion v{champ_version} ({champ_auc:.4f}) "
                          f"by {new_auc - champ_auc:+.4f} >= {margin}")
                client.set_registered_model_alias(name, "challenger", mv.version)
            else:
                gate = "rejected"
                reason = (f"AUC {new_auc:.4f} does not beat champion v{champ_version} ({champ_auc:.4f}) "
                          f"by the margin {margin} (difference {new_auc - champ_auc:+.4f})")
        client.set_model_version_tag(name, mv.version, "gate", gate)
        client.set_model_version_tag(name, mv.version, "gate_reason", reason)
        client.set_model_version_tag(name, mv.version, "validation_auc", f"{new_auc:.6f}")
        log.info("registered %s v%s: %s (%s)", name, mv.version, gate, reason)
        return {"version": str(mv.version), "gate": gate, "gate_reason": reason,
                "champion_auc": champ_auc, "run_id": run.info.run_id}
    except RegistryError:
        raise
    except Exception as e:  # MLflow raises many types: name the registry and the cause
        raise RegistryError(f"MLflow at {uri}: {type(e).__name__}: {e}") from e
