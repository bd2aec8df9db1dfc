//! Model changes while scoring: MLflow aliases re-resolved on every lifecycle
//! event and, as a fallback, on a timer. A new version is fetched, verified
//! and swapped in; the scorer picks it up at its next batch, so every batch
//! (and every partition's offsets in it) is scored by exactly one version.

use std::sync::Arc;
use std::time::Duration;

use leadscore_model::ModelHandle;
use leadscore_model::source::{Mlflow, ModelSource, Selector};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A model slot that follows a registry alias.
pub struct Followed {
    /// Role, for logs (`champion`, `challenger`, `canary`).
    pub role: &'static str,
    /// The handle the scorer reads.
    pub handle: Arc<ModelHandle>,
    /// Where it comes from.
    pub source: ModelSource,
    /// Set while the slot holds a stand-in; cleared once the alias resolves.
    pub stand_in: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Re-resolves followed aliases whenever `wake` fires or `every` passes;
/// `champion_changed` gets the new champion.
pub async fn follow(
    slots: Vec<Followed>,
    every: Option<Duration>,
    wake: Arc<Notify>,
    champion_changed: impl Fn(&leadscore_model::Model) + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let slots: Vec<Followed> = slots
        .into_iter()
        .filter(|s| {
            matches!(
                &s.source,
                ModelSource::Mlflow {
                    selector: Selector::Alias(_),
                    ..
                }
            )
        })
        .collect();
    if slots.is_empty() {
        return;
    }
    loop {
        let tick = async {
            match every {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tick => {}
        }
        for slot in &slots {
            if let Err(e) = refresh(slot, &champion_changed).await {
                let text = e.to_string();
                let removed = text.contains("RESOURCE_DOES_NOT_EXIST")
                    || text.contains("404")
                    || text.contains("not found");
                match &slot.stand_in {
                    // The alias was removed (a rollout ended): the role stops scoring until it is set again.
                    Some(flag) if removed => {
                        if !flag.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(
                                role = slot.role,
                                "alias removed; this role stops scoring until a rollout sets it again"
                            );
                        }
                    }
                    _ => {
                        tracing::warn!(role = slot.role, error = %e, "model refresh failed; the current model stays in service")
                    }
                }
            }
        }
    }
}

async fn refresh(
    slot: &Followed,
    champion_changed: &(impl Fn(&leadscore_model::Model) + Send + Sync),
) -> Result<(), leadscore_model::Error> {
    let ModelSource::Mlflow {
        base,
        name,
        selector,
    } = &slot.source
    else {
        return Ok(());
    };
    let current = slot.handle.get().metadata().version.clone();
    let version = Mlflow::new(base)?.version(name, selector).await?;
    if version.version == current {
        // The alias names what the slot holds (again): the role scores.
        if let Some(flag) = &slot.stand_in
            && flag.swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(role = slot.role, version = %current, "alias set again; this role scores");
        }
        return Ok(());
    }
    // Pin the exact version the alias named when we looked.
    let pinned = ModelSource::Mlflow {
        base: base.clone(),
        name: name.clone(),
        selector: Selector::Version(version.version.clone()),
    };
    let old = slot.handle.reload(&pinned).await?;
    if let Some(flag) = &slot.stand_in {
        flag.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(
        role = slot.role,
        from = %old.metadata().label(),
        to = %slot.handle.get().metadata().label(),
        "model version changed; it scores from the next batch"
    );
    if slot.role == "champion" {
        champion_changed(&slot.handle.get());
    }
    Ok(())
}

/// What the scorer follows on the lifecycle topic.
pub struct LifecycleFollow {
    /// Registered model name whose events count.
    pub model_name: String,
    /// The canary share to keep in step with the events.
    pub canary_percent: Arc<crate::CanaryPercent>,
    /// Decodes the events.
    pub decoder: leadscore_registry::Decoder,
}

/// Wakes `wake` for every record on the lifecycle topic (the models are
/// re-read from the registry of record) and applies the canary share an
/// event of our model carries: the share of a `canary` step, 0 otherwise.
pub async fn lifecycle(
    consumer: StreamConsumer,
    topic: String,
    wake: Arc<Notify>,
    follow: Option<LifecycleFollow>,
    shutdown: CancellationToken,
) {
    if let Err(e) = consumer.subscribe(&[&topic]) {
        tracing::warn!(%topic, error = %e, "cannot follow the lifecycle topic; relying on registry polling");
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            m = consumer.recv() => match m {
                Ok(m) => {
                    tracing::info!(partition = m.partition(), offset = m.offset(), "lifecycle event: re-resolving models");
                    if let (Some(f), Some(payload)) = (&follow, m.payload()) {
                        apply(f, payload).await;
                    }
                    wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lifecycle consumer error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn apply(f: &LifecycleFollow, payload: &[u8]) {
    use apache_avro::types::Value;
    let Ok(Value::Record(fields)) = f.decoder.decode(payload).await else {
        return;
    };
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let Some(Value::String(model)) = get("model_name") else {
        return;
    };
    if *model != f.model_name {
        return;
    }
    let stage = match get("stage") {
        Some(Value::Enum(_, s)) => s.as_str(),
        _ => return,
    };
    // Steps that say nothing about serving (training, registered, ...) leave the share alone.
    let percent = match (stage, get("canary_percent")) {
        ("canary", Some(Value::Int(p))) => f64::from(*p),
        ("promoted" | "rolled_back" | "shadow", _) => 0.0,
        _ => return,
    };
    let before = f.canary_percent.get();
    if before != percent {
        f.canary_percent.set(percent);
        tracing::warn!(model = %model, stage, from = before, to = percent, "canary share changed");
    }
}
