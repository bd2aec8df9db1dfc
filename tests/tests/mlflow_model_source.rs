//! A model trained and registered in the real MLflow by the training job is
//! fetched by alias, checksum-verified, loaded and scores leads; a failed
//! fetch leaves the serving model in place.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use leadscore_crm::{Generator, GeneratorConfig};
use leadscore_model::source::{Mlflow, ModelSource, Selector};
use leadscore_model::{ModelHandle, bundled_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn champion_from_mlflow_is_verified_loaded_and_scores() {
    let mlflow =
        std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 3, 12_000);
    let name = format!(
        "it-source-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    leadscore_e2e::train_and_register(&csv, &dir.path().join("out"), &name, &mlflow, "0.02");

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

/// MLflow's own basic-auth app, on a port of its own: the model source sends MLflow's client
/// credentials (`MLFLOW_TRACKING_USERNAME` / `_PASSWORD`), and without them the refusal says
/// what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlflow_behind_basic_auth_takes_the_credentials_and_refuses_without() {
    use leadscore_model::source::MlflowAuth;
    let dir = tempfile::tempdir().unwrap();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let ini = dir.path().join("basic_auth.ini");
    std::fs::write(
        &ini,
        format!(
            "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{}/auth.db\n\
             admin_username = admin\nadmin_password = {password}\n\
             authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let port = leadscore_e2e::free_port();
    let python = std::env::var("LEADSCORE_PYTHON").unwrap_or_else(|_| "python3".into());
    let _server = leadscore_e2e::ProcessGroup::spawn(
        std::process::Command::new(python)
            .args([
                "-m",
                "mlflow",
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}/mlflow.db", dir.path().display()))
            .env("MLFLOW_AUTH_CONFIG_PATH", &ini)
            .env(
                "MLFLOW_FLASK_SERVER_SECRET_KEY",
                uuid::Uuid::new_v4().simple().to_string(),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while leadscore_e2e::scorer::try_http_get(port, "/health")
        .await
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "MLflow with basic auth never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let alias = Selector::Alias("champion".into());

    let refused = Mlflow::with_auth(&base, MlflowAuth::None)
        .unwrap()
        .version("lead-scoring", &alias)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("401") && refused.contains("MLFLOW_TRACKING_USERNAME"),
        "{refused}"
    );
    let wrong = Mlflow::with_auth(
        &base,
        MlflowAuth::Basic {
            username: "admin".into(),
            password: "not-it".into(),
        },
    )
    .unwrap()
    .version("lead-scoring", &alias)
    .await
    .unwrap_err()
    .to_string();
    assert!(wrong.contains("401"), "{wrong}");
    // Let in: the model does not exist there, which only an authenticated caller learns.
    let admitted = Mlflow::with_auth(
        &base,
        MlflowAuth::Basic {
            username: "admin".into(),
            password: password.clone(),
        },
    )
    .unwrap()
    .version("lead-scoring", &alias)
    .await
    .unwrap_err()
    .to_string();
    assert!(
        !admitted.contains("401") && admitted.contains("RESOURCE_DOES_NOT_EXIST"),
        "{admitted}"
    );
}
