//! The Redis score cache.
//!
//! Format (documented in docs/architecture.md): key `leadscore:score:<lead_id>`,
//! value JSON [`CachedScore`], expiry `ttl` (a lead not rescored for that
//! long falls back to Postgres in lookups). Writers set after their Kafka
//! transaction commits and delete on tombstones; a Redis outage is an error
//! the caller counts, never a reason to stop scoring. The client reconnects
//! on the next call after a failure.

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis is unreachable or refused the command.
    #[error("redis at {target}: {reason}")]
    Redis {
        /// Host and port (no password).
        target: String,
        /// What failed.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cached score of one lead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedScore {
    /// Lead id.
    pub lead_id: String,
    /// Probability in [0, 1].
    pub score: f64,
    /// High, Medium or Low.
    pub band: String,
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// champion or canary.
    pub model_role: String,
    /// When it was scored, ms since epoch.
    pub scored_at_ms: i64,
}

/// The Redis key of a lead's score.
pub fn key(lead_id: &str) -> String {
    format!("leadscore:score:{lead_id}")
}

/// A Redis score cache with lazy (re)connection and per-call timeouts.
pub struct Cache {
    client: redis::Client,
    target: String,
    ttl: Duration,
    timeout: Duration,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A cache at `url` (`redis://host:port[/db]`); connects on first use.
    pub fn new(url: &str, ttl: Duration, timeout: Duration) -> Result<Self> {
        let target = url.rsplit('@').next().unwrap_or(url).to_string();
        let client = redis::Client::open(url).map_err(|e| Error::Redis {
            target: target.clone(),
            reason: format!("invalid URL: {e}"),
        })?;
        Ok(Self {
            client,
            target,
            ttl,
            timeout,
            conn: Mutex::new(None),
        })
    }

    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Redis {
            target: self.target.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| self.err("connect timed out"))?
            .map_err(|e| self.err(e))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    /// Sets `scores` (with the TTL) and deletes `deleted` in one pipeline.
    pub async fn write(&self, scores: &[CachedScore], deleted: &[String]) -> Result<()> {
        if scores.is_empty() && deleted.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for s in scores {
            let value = serde_json::to_string(s).map_err(|e| self.err(e))?;
            pipe.set_ex(key(&s.lead_id), value, self.ttl.as_secs().max(1))
                .ignore();
        }
        for id in deleted {
            pipe.del(key(id)).ignore();
        }
        let mut conn = self.connection().await?;
        let result = tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.forget().await;
                Err(self.err(e))
            }
            Err(_) => {
                self.forget().await;
                Err(self.err("write timed out"))
            }
        }
    }

    /// The cached score of `lead_id`, if any.
    pub async fn get(&self, lead_id: &str) -> Result<Option<CachedScore>> {
        let mut conn = self.connection().await?;
        let value: Option<String> =
            match tokio::time::timeout(self.timeout, conn.get(key(lead_id))).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    self.forget().await;
                    return Err(self.err(e));
                }
                Err(_) => {
                    self.forget().await;
                    return Err(self.err("read timed out"));
                }
            };
        value
            .map(|v| {
                serde_json::from_str(&v)
                    .map_err(|e| self.err(format!("bad cached value for a lead: {e}")))
            })
            .transpose()
    }
}

impl Cache {
    /// The cached scores of `lead_ids` (one MGET), in order; `None` for a miss.
    pub async fn get_many(&self, lead_ids: &[String]) -> Result<Vec<Option<CachedScore>>> {
        if lead_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = lead_ids.iter().map(|id| key(id)).collect();
        let mut conn = self.connection().await?;
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&keys);
        let values: Vec<Option<String>> =
            match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    self.forget().await;
                    return Err(self.err(e));
                }
                Err(_) => {
                    self.forget().await;
                    return Err(self.err("read timed out"));
                }
            };
        values
            .into_iter()
            .map(|v| {
                v.map(|v| {
                    serde_json::from_str(&v)
                        .map_err(|e| self.err(format!("bad cached value for a lead: {e}")))
                })
                .transpose()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced() {
        assert_eq!(key("lead_1"), "leadscore:score:lead_1");
    }

    #[test]
    fn url_credentials_stay_out_of_errors() {
        let c = Cache::new(
            "redis://:secret@127.0.0.1:1/0",
            Duration::from_secs(1),
            Duration::from_millis(50),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }
}
