//! The real registry enforces BACKWARD compatibility on our subjects and the
//! refusal names the subject and the field.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use leadscore_e2e::{config, unique};
use leadscore_registry::{Error, Registry};

#[tokio::test]
async fn backward_incompatible_edit_is_refused_naming_subject_and_field() {
    let registry = Registry::new(&config().registry).unwrap();
    let subject = leadscore_schemas::value_subject(&unique("it.compat"));
    let v1 = leadscore_schemas::find("Alert.avsc").unwrap().text;

    registry
        .set_compatibility(&subject, "BACKWARD")
        .await
        .unwrap();
    let id1 = registry.register(&subject, v1).await.unwrap();
    assert_eq!(registry.compatibility(&subject).await.unwrap(), "BACKWARD");
    assert_eq!(
        registry.register(&subject, v1).await.unwrap(),
        id1,
        "registering again is idempotent"
    );

    // A new required field cannot read old data: refused.
    let breaking = v1.replacen(
        "\"fields\": [",
        "\"fields\": [{\"name\": \"escalation_team\", \"type\": \"string\"},",
        1,
    );
    let verdict = registry.check(&subject, &breaking).await.unwrap();
    assert!(verdict.is_err(), "check reports the edit as incompatible");
    match registry.register(&subject, &breaking).await {
        Err(e @ Error::Incompatible { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&subject), "{text}");
            assert!(text.contains("escalation_team"), "{text}");
            assert!(text.contains("BACKWARD"), "{text}");
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    assert_eq!(
        registry.latest(&subject).await.unwrap().version,
        1,
        "nothing was registered"
    );

    // The same field with a default is a compatible evolution.
    let compatible = v1.replacen(
        "\"fields\": [",
        "\"fields\": [{\"name\": \"escalation_team\", \"type\": [\"null\", \"string\"], \"default\": null},",
        1,
    );
    assert_eq!(registry.check(&subject, &compatible).await.unwrap(), Ok(()));
    let id2 = registry.register(&subject, &compatible).await.unwrap();
    assert_ne!(id1, id2);
    assert_eq!(registry.latest(&subject).await.unwrap().version, 2);

    registry.delete_subject(&subject).await.unwrap();
}

#[tokio::test]
async fn every_repository_schema_is_accepted_by_the_registry() {
    let registry = Registry::new(&config().registry).unwrap();
    for file in leadscore_schemas::CATALOGUE {
        let subject = leadscore_schemas::value_subject(&unique("it.catalogue"));
        registry
            .register(&subject, file.text)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", file.file));
        registry.delete_subject(&subject).await.unwrap();
    }
}
