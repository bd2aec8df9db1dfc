//! Broken models give errors naming the model and what is wrong, and a
//! running handle keeps its last good model.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::fs;
use std::path::Path;

use leadscore_model::source::ModelSource;
use leadscore_model::{Error, Model, ModelHandle, bundled_dir, sha256_hex};
use serde_json::Value;

fn copy_bundled(to: &Path) {
    for f in ["model.onnx", "metadata.json"] {
        fs::copy(bundled_dir().join(f), to.join(f)).unwrap();
    }
}

fn edit_meta(dir: &Path, f: impl FnOnce(&mut Value)) {
    let mut meta: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("metadata.json")).unwrap()).unwrap();
    f(&mut meta);
    fs::write(
        dir.join("metadata.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    copy_bundled(dir.path());
    fs::remove_file(dir.path().join("model.onnx")).unwrap();
    let err = Model::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Read { .. }));
    let text = err.to_string();
    assert!(
        text.contains("model.onnx") && text.contains("lead-scoring vbundled-1"),
        "{text}"
    );
}

#[test]
fn checksum_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_bundled(dir.path());
    let mut bytes = fs::read(dir.path().join("model.onnx")).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    fs::write(dir.path().join("model.onnx"), &bytes).unwrap();
    let text = Model::load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        text.contains("SHA-256") && text.contains("corrupt"),
        "{text}"
    );
}

#[test]
fn corrupt_onnx_with_a_matching_checksum_is_an_onnx_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_bundled(dir.path());
    let garbage = b"not an onnx graph".to_vec();
    fs::write(dir.path().join("model.onnx"), &garbage).unwrap();
    edit_meta(dir.path(), |m| {
        m["onnx_sha256"] = sha256_hex(&garbage).into()
    });
    let err = Model::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    assert!(err.to_string().contains("lead-scoring vbundled-1"));
}

#[test]
fn metadata_that_does_not_match_the_graph_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_bundled(dir.path());
    edit_meta(dir.path(), |m| m["input"]["name"] = "inputs".into());
    let text = Model::load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        text.contains("`inputs`") && text.contains("features"),
        "{text}"
    );

    copy_bundled(dir.path());
    edit_meta(dir.path(), |m| {
        let extra = m["feature_spec"]["features"][4].clone();
        m["feature_spec"]["features"]
            .as_array_mut()
            .unwrap()
            .push(extra);
    });
    let text = Model::load_dir(dir.path()).unwrap_err().to_string();
    assert!(text.contains("10 features"), "{text}");

    copy_bundled(dir.path());
    fs::write(dir.path().join("metadata.json"), "{\"model_name\": 3}").unwrap();
    let err = Model::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Metadata { .. }), "{err}");
}

#[tokio::test]
async fn handle_keeps_the_last_good_model_when_a_reload_fails() {
    let handle = ModelHandle::new(Model::load_dir(&bundled_dir()).unwrap());
    let before = handle.get();
    let dir = tempfile::tempdir().unwrap();
    let err = handle
        .reload(&ModelSource::Dir(dir.path().to_path_buf()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Read { .. }));
    assert!(
        std::sync::Arc::ptr_eq(&before, &handle.get()),
        "still serving the same model"
    );

    copy_bundled(dir.path());
    edit_meta(dir.path(), |m| m["version"] = "bundled-2".into());
    let old = handle
        .reload(&ModelSource::Dir(dir.path().to_path_buf()))
        .await
        .unwrap();
    assert_eq!(old.metadata().version, "bundled-1");
    assert_eq!(handle.get().metadata().version, "bundled-2");
    // Whoever held the old model can still finish with it.
    assert_eq!(before.metadata().version, "bundled-1");
}
