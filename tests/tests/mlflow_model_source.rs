//! A model trained and registered in the real MLflow by the training job is
//! fetched by alias, checksum-verified, loaded and scores leads; a failed
//! fetch leaves the serving model in place.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::io::BufWriter;
use std::path::Path;
use std::process::Command;

use leadscore_crm::{Generator, GeneratorConfig};
use leadscore_model::source::{Mlflow, ModelSource, Selector};
use leadscore_model::{ModelHandle, bundled_dir};

fn train(csv: &Path, out: &Path, name: &str, mlflow: &str) {
    let python = std::env::var("LEADSCORE_PYTHON")
        .expect("LEADSCORE_PYTHON (from `deploy/local/stack env`) runs the training job");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(python)
        .current_dir(root.join("training"))
        .args(["-m", "leadscore_training.train", "--data"])
        .arg(csv)
        .arg("--out")
        .arg(out)
        .args([
            "--model-name",
            name,
            "--mlflow",
            mlflow,
            "--trials",
            "2",
            "--cv-splits",
            "2",
        ])
        .args(["--min-rows", "1000"])
        .status()
        .unwrap();
    assert!(status.success(), "training job failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn champion_from_mlflow_is_verified_loaded_and_scores() {
    let mlflow =
        std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    {
        let mut out = BufWriter::new(std::fs::File::create(&csv).unwrap());
        leadscore_crm::csv::write_header(&mut out).unwrap();
        for g in Generator::new(GeneratorConfig {
            seed: 3,
            ..Default::default()
        })
        .take(12_000)
        {
            leadscore_crm::csv::write_row(&mut out, &g).unwrap();
        }
    }
    let name = format!(
        "it-source-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    train(&csv, &dir.path().join("out"), &name, &mlflow);

    let url = format!("mlflow+{mlflow}/{name}@champion");
    let source = ModelSource::parse(&url).unwrap();
    let model = source.fetch().await.unwrap();
    assert_eq!(model.metadata().model_name, name);
    assert_eq!(model.metadata().version, "1");
    let lead = Generator::new(GeneratorConfig::default()).next_lead().lead;
    let p = model.score(&lead).unwrap().unwrap().probability;
    assert!((0.0..=1.0).contains(&p));

    // The registry's description of the version carries the checksum tag it was verified against.
    let client = Mlflow::new(&mlflow).unwrap();
    let mv = client
        .version(&name, &Selector::Version("1".into()))
        .await
        .unwrap();
    assert!(
        mv.tags
            .iter()
            .any(|t| t.key == "onnx_sha256" && t.value == model.metadata().onnx_sha256)
    );

    // Swapping to it works; an alias that does not exist fails and keeps the model in service.
    let handle = ModelHandle::new(leadscore_model::Model::load_dir(&bundled_dir()).unwrap());
    handle.reload(&source).await.unwrap();
    assert_eq!(handle.get().metadata().model_name, name);
    let missing = ModelSource::parse(&format!("mlflow+{mlflow}/{name}@challenger")).unwrap();
    let err = handle.reload(&missing).await.unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("challenger"), "{err}");
    assert_eq!(
        handle.get().metadata().model_name,
        name,
        "last good model still served"
    );

    // A registry that is down is named in the error.
    let down = ModelSource::parse(&format!("mlflow+http://127.0.0.1:9/{name}@champion")).unwrap();
    let err = down.fetch().await.unwrap_err().to_string();
    assert!(
        err.contains("127.0.0.1:9") && err.contains("unreachable"),
        "{err}"
    );
}
