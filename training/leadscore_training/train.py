"""Train, export and register a lead-scoring model.

    python -m leadscore_training.train --data leads.csv --out models/default
    python -m leadscore_training.train --data postgres://... --mlflow http://127.0.0.1:5000

Tunes LightGBM with Optuna over time-series cross-validation, evaluates on a
time-ordered holdout (the newest 20%), exports ONNX with the probability as a
plain tensor plus a metadata file, and (with --mlflow) logs the run, registers
a new model version and applies the evaluation gate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnxruntime as ort
import optuna
from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
from skl2onnx import convert_sklearn, update_registered_converter
from skl2onnx.common.data_types import FloatTensorType
from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import TimeSeriesSplit

from . import data, registry
from .features import FEATURES, FeatureSpec, reference

log = logging.getLogger("leadscore.training")

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"


class TrainingError(Exception):
    """Training refused or failed; the message says why."""


def export_onnx(model: lgb.LGBMClassifier) -> bytes:
    update_registered_converter(
        lgb.LGBMClassifier, "LightGbmLGBMClassifier",
        calculate_linear_classifier_output_shapes, convert_lightgbm,
        options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
    )
    onx = convert_sklearn(
        model, initial_types=[(INPUT_NAME, FloatTensorType([None, len(FEATURES)]))],
        options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3},
    )
    # skl2onnx names the graph with a random UUID; a fixed name makes the bytes reproducible.
    onx.graph.name = "leadscore_lead_model"
    # The converter collects opsets in a set: sort them so the bytes do not depend on hashing.
    imports = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in imports:
        onx.opset_import.add(domain=domain, version=version)
    exact_thresholds(onx, model)
    return onx.SerializeToString()


def exact_thresholds(onx, model: lgb.LGBMClassifier) -> None:
    """Makes float32 split thresholds decide exactly like LightGBM's float64 ones.

    ONNX stores thresholds as float32, rounded to nearest. When LightGBM's
    threshold t lies just below a float32 value x, float32(t) == x and
    `x <= t` flips for inputs equal to x. Every input here is float32, so
    the largest float32 not above t decides identically for all of them.
    """
    per_tree: dict[int, dict[float, set[float]]] = {}

    def walk(tree: int, node: dict) -> None:
        if "split_feature" not in node:
            return
        t = float(node["threshold"])
        with np.errstate(over="ignore"):  # LightGBM's +max-double thresholds become +inf, as in ONNX
            key = float(np.float32(t))
        per_tree.setdefault(tree, {}).setdefault(key, set()).add(t)
        walk(tree, node["left_child"])
        walk(tree, node["right_child"])

    for info in model.booster_.dump_model()["tree_info"]:
        walk(info["tree_index"], info["tree_structure"])
    ensembles = [n for n in onx.graph.node if n.op_type.startswith("TreeEnsemble")]
    if len(ensembles) != 1:
        raise TrainingError(f"expected one tree ensemble in the ONNX graph, found {len(ensembles)}")
    attrs = {a.name: a for a in ensembles[0].attribute}
    trees = list(attrs["nodes_treeids"].ints)
    modes = [m.decode() if isinstance(m, bytes) else m for m in attrs["nodes_modes"].strings]
    values = list(attrs["nodes_values"].floats)
    for i, (tree, mode) in enumerate(zip(trees, modes, strict=True)):
        if mode == "LEAF":
            continue
        if mode != "BRANCH_LEQ":
            raise TrainingError(f"unexpected split mode {mode} in the ONNX graph")
        f32 = float(np.float32(values[i]))
        originals = per_tree.get(tree, {}).get(f32)
        if not originals:
            raise TrainingError(f"ONNX threshold {values[i]} of tree {tree} has no LightGBM counterpart")
        below = {t < f32 for t in originals}
        if below == {True}:
            values[i] = float(np.nextafter(np.float32(f32), np.float32(-np.inf)))
        elif len(below) > 1:
            raise TrainingError(f"tree {tree}: thresholds {sorted(originals)} share float32 {f32}; cannot export exactly")
    del attrs["nodes_values"].floats[:]
    attrs["nodes_values"].floats.extend(values)


def tree_covers(onnx_bytes: bytes, model: lgb.LGBMClassifier) -> list[list[float]]:
    """Training rows that reached each node, per tree, indexed by the ONNX graph's node ids.

    The trees' covers are what path-dependent TreeSHAP weighs a feature outside a coalition
    by (LightGBM's own ``pred_contrib`` uses the same counts); the ONNX graph does not carry
    them. Walks each LightGBM tree and its ONNX counterpart together: the left child is the
    ``<=`` branch in both.
    """
    import onnx

    onx = onnx.load_from_string(onnx_bytes)
    ensembles = [n for n in onx.graph.node if n.op_type.startswith("TreeEnsemble")]
    if len(ensembles) != 1:
        raise TrainingError(f"expected one tree ensemble in the ONNX graph, found {len(ensembles)}")
    attrs = {a.name: a for a in ensembles[0].attribute}
    tree_ids = list(attrs["nodes_treeids"].ints)
    node_ids = list(attrs["nodes_nodeids"].ints)
    yes = list(attrs["nodes_truenodeids"].ints)
    no = list(attrs["nodes_falsenodeids"].ints)
    modes = [m.decode() if isinstance(m, bytes) else m for m in attrs["nodes_modes"].strings]
    children: dict[tuple[int, int], tuple[int, int, str]] = {}
    for t, n, y, f, m in zip(tree_ids, node_ids, yes, no, modes, strict=True):
        children[(t, n)] = (y, f, m)
    covers: list[list[float]] = []
    for info in model.booster_.dump_model()["tree_info"]:
        t = info["tree_index"]
        ids = [n for (tt, n) in children if tt == t]
        if not ids:
            raise TrainingError(f"tree {t} is not in the ONNX graph")
        reached = {c for (tt, n), (y, f, m) in children.items() if tt == t and m != "LEAF" for c in (y, f)}
        roots = [n for n in ids if n not in reached]
        if len(roots) != 1:
            raise TrainingError(f"tree {t}: {len(roots)} roots in the ONNX graph")
        out = [0.0] * (max(ids) + 1)
        total = float(info["tree_structure"].get("internal_count", info["tree_structure"].get("leaf_count", 0)))

        def walk(node: dict, onnx_id: int) -> None:
            y, f, mode = children[(t, onnx_id)]
            if "split_feature" in node:
                if mode == "LEAF":
                    raise TrainingError(f"tree {t}: node {onnx_id} is a leaf in ONNX but a split in LightGBM")
                out[onnx_id] = float(node["internal_count"])
                walk(node["left_child"], y)
                walk(node["right_child"], f)
            else:
                if mode != "LEAF":
                    raise TrainingError(f"tree {t}: node {onnx_id} is a split in ONNX but a leaf in LightGBM")
                out[onnx_id] = float(node.get("leaf_count", total))

        walk(info["tree_structure"], roots[0])
        covers.append(out)
    return covers


def onnx_scores(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: X})[0][:, 1]


def tune(X: np.ndarray, y: np.ndarray, trials: int, splits: int, seed: int) -> tuple[dict, float]:
    cv = TimeSeriesSplit(n_splits=splits)

    def objective(trial: optuna.Trial) -> float:
        params = {
            "n_estimators": trial.suggest_int("n_estimators", 50, 300, step=25),
            "num_leaves": trial.suggest_int("num_leaves", 7, 63),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "min_child_samples": trial.suggest_int("min_child_samples", 10, 200, log=True),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.6, 1.0),
            "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        }
        aucs = []
        for tr, va in cv.split(X):
            m = lgb.LGBMClassifier(**params, **fixed(seed)).fit(X[tr], y[tr])
            aucs.append(roc_auc_score(y[va], m.predict_proba(X[va])[:, 1]))
        return float(np.mean(aucs))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return study.best_params, float(study.best_value)


def fixed(seed: int) -> dict:
    return {"objective": "binary", "random_state": seed, "deterministic": True,
            "force_row_wise": True, "n_jobs": 1, "verbose": -1}


def train(args: argparse.Namespace) -> dict:
    df = data.load(args.data)
    window, info = data.labelled(df, months=args.months)
    if info["rows"] < args.min_rows:
        raise TrainingError(
            f"refusing to train on {info['rows']} labelled leads from {info['start']} to {info['end']}: "
            f"at least {args.min_rows} are required (--min-rows); wait for more outcomes or seed more leads"
        )
    if info["positives"] == 0 or info["positives"] == info["rows"]:
        raise TrainingError("labelled leads are all one class; AUC is undefined")
    cut = int(len(window) * (1 - args.holdout))
    train_df, hold_df = window.iloc[:cut], window.iloc[cut:]
    spec = FeatureSpec.fit(train_df)
    X_train, X_hold = spec.transform(train_df), spec.transform(hold_df)
    y_train = (train_df["status"] == "converted").to_numpy(dtype=int)
    y_hold = (hold_df["status"] == "converted").to_numpy(dtype=int)

    log.info("tuning on %d rows with %d trials", len(train_df), args.trials)
    params, cv_auc = tune(X_train, y_train, args.trials, args.cv_splits, args.seed)
    model = lgb.LGBMClassifier(**params, **fixed(args.seed)).fit(X_train, y_train)
    onnx_bytes = export_onnx(model)
    train_auc = roc_auc_score(y_train, model.predict_proba(X_train)[:, 1])
    hold_scores = onnx_scores(onnx_bytes, X_hold)
    holdout_auc = roc_auc_score(y_hold, hold_scores)
    max_diff = float(np.abs(hold_scores - model.predict_proba(X_hold)[:, 1]).max())
    if max_diff > 1e-5:
        raise TrainingError(f"ONNX export differs from LightGBM by {max_diff}; refusing to publish")

    metadata = {
        "model_name": args.model_name,
        "version": args.version,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if not args.reproducible else info["end"],
        "framework": {"lightgbm": lgb.__version__, "onnx_opset": 17},
        "input": {"name": INPUT_NAME, "shape": [None, len(FEATURES)], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [None, 2], "positive_index": 1},
        "feature_spec": spec.to_json(),
        "reference": reference(train_df, X_train, model.predict_proba(X_train)[:, 1], spec),
        "metrics": {"train_auc": train_auc, "cv_auc": cv_auc, "validation_auc": holdout_auc,
                    "onnx_max_abs_diff": max_diff},
        "params": params,
        "data_window": {**info, "train_rows": len(train_df), "holdout_rows": len(hold_df)},
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        # Per-feature contributions (TreeSHAP) need each node's training rows.
        "explain": {"method": "tree_path_dependent", "covers": tree_covers(onnx_bytes, model)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onnx_bytes)
    # LightGBM's own model, the oracle of the contribution parity vectors (parity.py).
    model.booster_.save_model(str(out / "lightgbm.txt"))
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    log.info("validation AUC %.4f (cv %.4f), model in %s", holdout_auc, cv_auc, out)

    result = {"out": str(out), "validation_auc": holdout_auc, "cv_auc": cv_auc}
    if args.mlflow:
        # Last chance before MLflow changes: a worker killed meanwhile re-runs the request, and
        # this run must not register a version nobody reports.
        require_parent(args.parent_pid)
        result.update(registry.publish(args.mlflow, args.model_name, out, metadata,
                                       hold_df, y_hold, args.gate_margin))
    return result


class ParentGone(Exception):
    """The worker that started this run is gone."""


def require_parent(parent_pid: int | None) -> None:
    """Raises ParentGone when this process was started by `parent_pid` and it has exited
    (the process is then re-parented, so its parent id changes)."""
    if parent_pid is not None and os.getppid() != parent_pid:
        raise ParentGone(f"the worker (pid {parent_pid}) that started this run is gone; "
                         "stopping without registering (it runs the request again)")


def watch_parent(parent_pid: int | None, every_s: float = 0.2) -> None:
    """Exits this process soon after the worker that started it is killed (SIGKILL leaves
    no chance to stop its children): its request is run again by the next worker, and an
    orphaned run must not go on to register a version in MLflow."""
    if parent_pid is None:
        return

    def watch() -> None:
        while True:
            try:
                require_parent(parent_pid)
            except ParentGone as e:
                log.error("%s", e)
                os._exit(75)
            time.sleep(every_s)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leadscore_training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CSV file from `leadscore crm seed --out` or a postgres:// URL")
    p.add_argument("--out", required=True, help="directory for model.onnx and metadata.json")
    p.add_argument("--model-name", default="lead-scoring")
    p.add_argument("--version", default="local", help="version recorded in metadata when not registered")
    p.add_argument("--trials", type=int, default=30, help="Optuna trials")
    p.add_argument("--cv-splits", type=int, default=4, help="time-series CV folds")
    p.add_argument("--holdout", type=float, default=0.2, help="newest share of rows held out")
    p.add_argument("--months", type=int, default=6, help="data window: labelled leads of the last N months")
    p.add_argument("--min-rows", type=int, default=10_000, help="refuse to train on fewer labelled rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mlflow", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI; registers the version and applies the gate (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_const", const=None)
    p.add_argument("--gate-margin", type=float, default=0.02,
                   help="AUC points a new version must beat the champion by to become challenger")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process (the training worker) is gone")
    p.add_argument("--reproducible", action="store_true",
                   help="record the data window end instead of the wall clock, for committed models")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    watch_parent(args.parent_pid)
    try:
        result = train(args)
    except (TrainingError, data.DataError, registry.RegistryError, ParentGone) as e:
        log.error("%s", e)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
