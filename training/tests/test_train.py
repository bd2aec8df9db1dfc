import json
import os
import uuid

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from leadscore_training import train


def run(args):
    return train.main([str(a) for a in args])


def test_refuses_to_train_on_too_few_rows(leads_csv, tmp_path, caplog):
    code = run(["--data", leads_csv, "--out", tmp_path, "--no-mlflow", "--min-rows", 1_000_000])
    assert code == 2
    assert "refusing to train" in caplog.text and "at least 1000000 are required" in caplog.text
    assert not (tmp_path / "model.onnx").exists()


def test_missing_data_file_is_named(tmp_path, caplog):
    assert run(["--data", tmp_path / "nope.csv", "--out", tmp_path, "--no-mlflow"]) == 2
    assert "nope.csv does not exist" in caplog.text


def test_training_exports_onnx_and_metadata(leads_csv, tmp_path):
    assert run(["--data", leads_csv, "--out", tmp_path, "--no-mlflow", "--trials", 2,
                "--cv-splits", 2, "--min-rows", 1000]) == 0
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["metrics"]["validation_auc"] > 0.6, "the generator's signal is learnable"
    assert meta["metrics"]["onnx_max_abs_diff"] < 1e-5
    assert [f["name"] for f in meta["feature_spec"]["features"]][:2] == ["company_size", "industry"]
    assert set(meta["reference"]["numeric"]) == {"page_views", "time_on_site", "form_completion_time",
                                                 "hour_of_day", "day_of_week"}
    assert meta["data_window"]["rows"] >= 1000
    # Every node's training rows, by ONNX node id: a split's rows are its children's.
    import onnx
    covers = meta["explain"]["covers"]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ens = next(n for n in graph.node if n.op_type.startswith("TreeEnsemble"))
    a = {x.name: x for x in ens.attribute}
    modes = [m.decode() for m in a["nodes_modes"].strings]
    assert len(covers) == len(set(a["nodes_treeids"].ints))
    for t, n, y, f, m in zip(a["nodes_treeids"].ints, a["nodes_nodeids"].ints,
                             a["nodes_truenodeids"].ints, a["nodes_falsenodeids"].ints, modes, strict=True):
        assert covers[t][n] > 0
        if m != "LEAF":
            assert covers[t][n] == covers[t][y] + covers[t][f], (t, n)
    assert (tmp_path / "lightgbm.txt").exists()


def test_gate_registers_champion_then_rejects_or_promotes_by_margin(leads_csv, tmp_path, mlflow_uri):
    name = f"it-gate-{uuid.uuid4().hex[:10]}"
    common = ["--data", leads_csv, "--mlflow", mlflow_uri, "--model-name", name, "--trials", 2,
              "--cv-splits", 2, "--min-rows", 1000]
    client = MlflowClient(tracking_uri=mlflow_uri)

    assert run([*common, "--out", tmp_path / "v1"]) == 0
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert json.loads((tmp_path / "v1" / "metadata.json").read_text())["version"] == "1"

    # Same data, same seed: same AUC, so it cannot beat the champion by +0.02.
    assert run([*common, "--out", tmp_path / "v2"]) == 0
    v2 = client.get_model_version(name, "2")
    assert v2.tags["gate"] == "rejected"
    assert "does not beat champion v1" in v2.tags["gate_reason"]
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "challenger")

    # A margin it can meet: the new version becomes challenger, the champion stays.
    assert run([*common, "--out", tmp_path / "v3", "--gate-margin", -0.5]) == 0
    assert client.get_model_version_by_alias(name, "challenger").version == "3"
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version(name, "3").tags["gate"] == "challenger"


def test_a_run_whose_worker_is_gone_stops_before_registering():
    train.require_parent(None)
    train.require_parent(os.getppid())
    with pytest.raises(train.ParentGone, match="stopping without registering"):
        train.require_parent(os.getppid() + 1_000_000)
