//! The cache's newer-wins writes against the real local Redis (deploy/local/stack up).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::time::Duration;

use leadscore_cache::{Cache, CachedScore};

fn score(id: &str, score: f64, at: i64) -> CachedScore {
    CachedScore {
        lead_id: id.into(),
        score,
        band: "Low".into(),
        model_name: "m".into(),
        model_version: "1".into(),
        model_role: "champion".into(),
        scored_at_ms: at,
        reasons: Default::default(),
    }
}

#[tokio::test]
async fn older_writes_never_replace_newer_ones_and_deletes_stay_deleted() {
    let url = std::env::var("LEADSCORE_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
    let cache = Cache::new(&url, Duration::from_secs(60), Duration::from_secs(2)).unwrap();
    let id = format!("it-newer-wins-{}", std::process::id());
    cache.write(&[score(&id, 0.9, 100)], &[]).await.unwrap();
    // A delayed, older write arrives after the newer one: ignored.
    cache.write(&[score(&id, 0.1, 50)], &[]).await.unwrap();
    assert_eq!(cache.get(&id).await.unwrap().map(|s| s.score), Some(0.9));
    // Deleted at 200; a late score from before the delete does not bring it back.
    cache.write(&[], &[(id.clone(), 200)]).await.unwrap();
    assert_eq!(cache.get(&id).await.unwrap(), None);
    cache.write(&[score(&id, 0.5, 150)], &[]).await.unwrap();
    assert_eq!(
        cache.get_many(std::slice::from_ref(&id)).await.unwrap(),
        vec![None]
    );
    // A lead created again after the delete is cached again.
    cache.write(&[score(&id, 0.7, 300)], &[]).await.unwrap();
    assert_eq!(cache.get(&id).await.unwrap().map(|s| s.score), Some(0.7));
    cache.write(&[], &[(id.clone(), 301)]).await.unwrap();
}
