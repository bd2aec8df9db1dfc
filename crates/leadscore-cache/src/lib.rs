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
    /// Why: the features that moved the score most, as `feature=value +0.31`, largest
    /// first; empty for a model without reasons.
    #[serde(default, skip_serializing_if = "no_reasons")]
    pub reasons: std::sync::Arc<[String]>,
}

fn no_reasons(reasons: &std::sync::Arc<[String]>) -> bool {
    reasons.is_empty()
}

impl CachedScore {
    /// Reads a decoded `LeadScore` record (any version of `schemas/LeadScore.avsc`): the one
    /// reader of a live score for everything that follows the score topic. The error names
    /// the first field missing.
    pub fn from_lead_score(value: &apache_avro::types::Value) -> std::result::Result<Self, String> {
        use apache_avro::types::Value;
        let Value::Record(fields) = value else {
            return Err("not a record".into());
        };
        let get = |name: &str| leadscore_schemas::Fields::new(fields).get(name);
        let text = |name: &str| match get(name) {
            Some(Value::String(s) | Value::Enum(_, s)) => Ok(s.clone()),
            _ => Err(format!("no `{name}`")),
        };
        let score = match get("score") {
            Some(Value::Double(d)) => *d,
            _ => return Err("no `score`".into()),
        };
        let scored_at_ms = match get("scored_at") {
            Some(Value::TimestampMillis(t) | Value::Long(t)) => *t,
            _ => return Err("no `scored_at`".into()),
        };
        let reasons: Vec<String> = match get("reasons") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(CachedScore {
            lead_id: text("lead_id")?,
            score,
            band: text("band")?,
            model_name: text("model_name")?,
            model_version: text("model_version")?,
            model_role: text("model_role")?,
            scored_at_ms,
            reasons: reasons.into(),
        })
    }
}

/// The marker a deletion leaves for the TTL, so a late older score cannot bring the lead back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Deleted {
    lead_id: String,
    deleted_at_ms: i64,
}

/// KEYS: the entries; ARGV[1]: TTL in ms, then per key its version (ms) and value. Sets a key
/// unless what it holds is newer. Returns how many were written.
const NEWER_WINS: &str = r#"
local ttl = tonumber(ARGV[1])
local written = 0
for i, k in ipairs(KEYS) do
  local version = tonumber(ARGV[2 * i])
  local current = -1
  local held = redis.call('GET', k)
  if held then
    local ok, doc = pcall(cjson.decode, held)
    if ok and type(doc) == 'table' then
      current = tonumber(doc['scored_at_ms'] or doc['deleted_at_ms']) or -1
    end
  end
  if version >= current then
    redis.call('SET', k, ARGV[2 * i + 1], 'PX', ttl)
    written = written + 1
  end
end
return written
"#;

fn newer_wins() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(NEWER_WINS))
}

/// A cached value: a score, or `None` for a deletion marker.
fn parse(value: &str) -> std::result::Result<Option<CachedScore>, serde_json::Error> {
    match serde_json::from_str::<CachedScore>(value) {
        Ok(s) => Ok(Some(s)),
        Err(e) => match serde_json::from_str::<Deleted>(value) {
            Ok(_) => Ok(None),
            Err(_) => Err(e),
        },
    }
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

    /// Writes `scores` and marks `deleted` (lead id, deletion time in ms) in one script, newer
    /// wins: an entry is replaced only by a score or deletion at least as recent as what it
    /// holds (`scored_at_ms` / `deleted_at_ms`), so a delayed or reordered write never puts
    /// an older score back or resurrects a deleted lead. A deletion is kept as a marker for
    /// the TTL; reads see it as absent.
    pub async fn write(&self, scores: &[CachedScore], deleted: &[(String, i64)]) -> Result<()> {
        if scores.is_empty() && deleted.is_empty() {
            return Ok(());
        }
        let mut invocation = newer_wins().prepare_invoke();
        invocation.arg(self.ttl.as_millis().max(1) as u64);
        for s in scores {
            let value = serde_json::to_string(s).map_err(|e| self.err(e))?;
            invocation
                .key(key(&s.lead_id))
                .arg(s.scored_at_ms)
                .arg(value);
        }
        for (id, at) in deleted {
            let value = serde_json::to_string(&Deleted {
                lead_id: id.clone(),
                deleted_at_ms: *at,
            })
            .map_err(|e| self.err(e))?;
            invocation.key(key(id)).arg(*at).arg(value);
        }
        let mut conn = self.connection().await?;
        let result =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<i64>(&mut conn)).await;
        match result {
            Ok(Ok(_written)) => Ok(()),
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

    /// Removes the entries of `lead_ids` outright, markers and all (cleaning up test or bench
    /// data; the scorer marks deletions with [`Cache::write`] instead).
    pub async fn purge(&self, lead_ids: &[String]) -> Result<()> {
        if lead_ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = lead_ids.iter().map(|id| key(id)).collect();
        let mut conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, conn.del::<_, i64>(keys)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.forget().await;
                Err(self.err(e))
            }
            Err(_) => {
                self.forget().await;
                Err(self.err("purge timed out"))
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
        match value {
            Some(v) => parse(&v).map_err(|e| self.err(format!("bad cached value for a lead: {e}"))),
            None => Ok(None),
        }
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
            .map(|v| match v {
                Some(v) => {
                    parse(&v).map_err(|e| self.err(format!("bad cached value for a lead: {e}")))
                }
                None => Ok(None),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_markers_read_as_absent_and_garbage_is_an_error() {
        let marker = serde_json::to_string(&Deleted {
            lead_id: "l".into(),
            deleted_at_ms: 5,
        })
        .unwrap();
        assert_eq!(parse(&marker).unwrap(), None);
        assert!(parse("{\"x\": 1}").is_err());
    }

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
