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

use crate::Metrics;

/// A model slot that follows a registry alias.
pub struct Followed {
    /// Role, for logs (`champion`, `challenger`, `canary`).
    pub role: &'static str,
    /// The handle the scorer reads.
    pub handle: Arc<ModelHandle>,
    /// Where it comes from.
    pub source: ModelSource,
}

/// Re-resolves followed aliases whenever `wake` fires or `every` passes.
pub async fn follow(
    slots: Vec<Followed>,
    every: Option<Duration>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
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
            if let Err(e) = refresh(slot, &metrics).await {
                tracing::warn!(role = slot.role, error = %e, "model refresh failed; the current model stays in service");
            }
        }
    }
}

async fn refresh(slot: &Followed, metrics: &Metrics) -> Result<(), leadscore_model::Error> {
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
        return Ok(());
    }
    // Pin the exact version the alias named when we looked.
    let pinned = ModelSource::Mlflow {
        base: base.clone(),
        name: name.clone(),
        selector: Selector::Version(version.version.clone()),
    };
    let old = slot.handle.reload(&pinned).await?;
    tracing::info!(
        role = slot.role,
        from = %old.metadata().label(),
        to = %slot.handle.get().metadata().label(),
        "model version changed; it scores from the next batch"
    );
    if slot.role == "champion" {
        metrics.set_model(slot.handle.get().metadata().label());
    }
    Ok(())
}

/// Wakes `wake` for every record on the lifecycle topic (its content is re-read from the registry of record).
pub async fn lifecycle(
    consumer: StreamConsumer,
    topic: String,
    wake: Arc<Notify>,
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
