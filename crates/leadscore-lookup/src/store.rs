//! Where scores are read: the service's memory (kept current by the live
//! score stream) first, then the Redis cache, then the CRM's `lead_scores`
//! table on a miss or when Redis is down. The answer says where it came from.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use leadscore_cache::{Cache, CachedScore};
use tokio::sync::Mutex;
use tokio_postgres::{Client, Statement};

use crate::Error;
use crate::memory::{Known, Memory};

const ONE: &str = "SELECT lead_id, score, band, model_name, model_version, model_role, scored_at, \
                   reasons FROM public.lead_scores WHERE lead_id = $1";
const MANY: &str = "SELECT lead_id, score, band, model_name, model_version, model_role, scored_at, \
                    reasons FROM public.lead_scores WHERE lead_id = ANY($1)";

/// Where a stored score was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The service's memory, kept current by the live score stream.
    Memory,
    /// The Redis cache.
    Cache,
    /// The CRM database.
    Database,
}

impl Origin {
    /// Name for logs and REST answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Memory => "memory",
            Origin::Cache => "cache",
            Origin::Database => "database",
        }
    }
}

/// A stored score and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The score.
    pub score: CachedScore,
    /// Where it came from.
    pub origin: Origin,
}

struct Conn {
    client: Client,
    one: Statement,
    many: Statement,
}

/// A fixed set of Postgres connections, used round robin, each re-opened on
/// its next use after it fails. Queries on one connection are pipelined.
pub struct Pool {
    url: String,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl Pool {
    /// `size` connections to `url`, opened on first use; every call bounded by `timeout`.
    pub fn new(url: &str, size: usize, timeout: Duration) -> Self {
        Self {
            url: url.to_string(),
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            timeout,
        }
    }

    async fn conn(&self) -> Result<(usize, Arc<Conn>), String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.client.is_closed()
        {
            return Ok((i, c.clone()));
        }
        let open = async {
            let client = leadscore_postgres::connect(&self.url)
                .await
                .map_err(|e| e.to_string())?;
            let one = client.prepare(ONE).await.map_err(|e| e.to_string())?;
            let many = client.prepare(MANY).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Conn { client, one, many })
        };
        let c = Arc::new(
            tokio::time::timeout(self.timeout, open)
                .await
                .map_err(|_| "connecting timed out".to_string())??,
        );
        *slot = Some(c.clone());
        Ok((i, c))
    }

    async fn forget(&self, i: usize) {
        *self.slots[i].lock().await = None;
    }

    async fn query(&self, ids: &[String]) -> Result<Vec<CachedScore>, String> {
        let (i, c) = self.conn().await?;
        let run = async {
            if let [one] = ids {
                c.client.query(&c.one, &[one]).await
            } else {
                c.client.query(&c.many, &[&ids]).await
            }
        };
        let rows = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.forget(i).await;
                return Err(e.to_string());
            }
            Err(_) => {
                self.forget(i).await;
                return Err("query timed out".into());
            }
        };
        rows.iter()
            .map(|r| {
                let scored_at: chrono::DateTime<chrono::Utc> =
                    r.try_get(6).map_err(|e| e.to_string())?;
                Ok(CachedScore {
                    lead_id: r.try_get(0).map_err(|e| e.to_string())?,
                    score: r.try_get(1).map_err(|e| e.to_string())?,
                    band: r.try_get(2).map_err(|e| e.to_string())?,
                    model_name: r.try_get(3).map_err(|e| e.to_string())?,
                    model_version: r.try_get(4).map_err(|e| e.to_string())?,
                    model_role: r.try_get(5).map_err(|e| e.to_string())?,
                    scored_at_ms: scored_at.timestamp_millis(),
                    reasons: r
                        .try_get::<_, Option<Vec<String>>>(7)
                        .map_err(|e| e.to_string())?
                        .unwrap_or_default()
                        .into(),
                })
            })
            .collect()
    }
}

/// Counters of the read path.
#[derive(Debug, Default)]
pub struct StoreCounts {
    /// Answers from the memory (deleted leads included).
    pub memory_hits: AtomicU64,
    /// Answers from Redis.
    pub cache_hits: AtomicU64,
    /// Redis misses.
    pub cache_misses: AtomicU64,
    /// Redis errors (down, slow).
    pub cache_errors: AtomicU64,
    /// Postgres errors.
    pub db_errors: AtomicU64,
}

/// Memory first, then Redis, then Postgres.
pub struct Store {
    memory: Option<Arc<Memory>>,
    cache: Option<Cache>,
    db: Pool,
    /// What happened so far.
    pub counts: StoreCounts,
}

impl Store {
    /// A store over an optional cache and the CRM database.
    pub fn new(cache: Option<Cache>, db: Pool) -> Self {
        Self {
            memory: None,
            cache,
            db,
            counts: StoreCounts::default(),
        }
    }

    /// Answers from `memory` first, and remembers what Redis and Postgres return.
    pub fn with_memory(mut self, memory: Option<Arc<Memory>>) -> Self {
        self.memory = memory;
        self
    }

    /// The memory, if there is one.
    pub fn memory(&self) -> Option<&Memory> {
        self.memory.as_deref()
    }

    /// The latest score of `lead_id`; `None` when neither store has it.
    pub async fn get(&self, lead_id: &str) -> Result<Option<Found>, Error> {
        let ids = [lead_id.to_string()];
        let mut found = self.get_many(&ids).await?;
        Ok(found.pop().flatten())
    }

    /// Scores of `lead_ids`, in order. What the memory does not know is read
    /// from Redis; misses there (or all of them, when Redis is down) from
    /// Postgres in one query. A lead the stream deleted is `None`.
    /// Unavailable only when an answer cannot be given.
    pub async fn get_many(&self, lead_ids: &[String]) -> Result<Vec<Option<Found>>, Error> {
        let Some(memory) = &self.memory else {
            return self.read_stores(lead_ids).await;
        };
        let mut out: Vec<Option<Found>> = vec![None; lead_ids.len()];
        let mut unknown = Vec::new();
        for (i, id) in lead_ids.iter().enumerate() {
            match memory.get(id) {
                Some(Known::Score(score)) => {
                    out[i] = Some(Found {
                        score,
                        origin: Origin::Memory,
                    });
                }
                Some(Known::Deleted) => {}
                None => unknown.push(i),
            }
        }
        self.counts
            .memory_hits
            .fetch_add((lead_ids.len() - unknown.len()) as u64, Ordering::Relaxed);
        if unknown.is_empty() {
            return Ok(out);
        }
        let ids: Vec<String> = unknown.iter().map(|&i| lead_ids[i].clone()).collect();
        let read = self.read_stores(&ids).await?;
        for (i, found) in unknown.into_iter().zip(read) {
            if let Some(f) = &found {
                memory.read(&f.score);
            }
            out[i] = found;
        }
        Ok(out)
    }

    /// Redis, then Postgres for the misses.
    async fn read_stores(&self, lead_ids: &[String]) -> Result<Vec<Option<Found>>, Error> {
        let mut out: Vec<Option<Found>> = vec![None; lead_ids.len()];
        let mut cache_error = None;
        if let Some(cache) = &self.cache {
            match cache.get_many(lead_ids).await {
                Ok(hits) => {
                    for (slot, hit) in out.iter_mut().zip(hits) {
                        *slot = hit.map(|score| Found {
                            score,
                            origin: Origin::Cache,
                        });
                    }
                }
                Err(e) => {
                    self.counts.cache_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "score cache unavailable; reading Postgres");
                    cache_error = Some(e.to_string());
                }
            }
        }
        let hits = out.iter().filter(|f| f.is_some()).count() as u64;
        self.counts.cache_hits.fetch_add(hits, Ordering::Relaxed);
        let missing: Vec<String> = lead_ids
            .iter()
            .zip(&out)
            .filter(|(_, f)| f.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if missing.is_empty() {
            return Ok(out);
        }
        if cache_error.is_none() && self.cache.is_some() {
            self.counts
                .cache_misses
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
        }
        let rows = match self.db.query(&missing).await {
            Ok(rows) => rows,
            Err(e) => {
                self.counts.db_errors.fetch_add(1, Ordering::Relaxed);
                let why = match cache_error {
                    Some(c) => format!(
                        "{c}; CRM database at {}: {e}",
                        leadscore_postgres::redact(&self.db.url)
                    ),
                    None => format!(
                        "CRM database at {}: {e}",
                        leadscore_postgres::redact(&self.db.url)
                    ),
                };
                return Err(Error::Unavailable(why));
            }
        };
        let rows: std::collections::HashMap<String, CachedScore> =
            rows.into_iter().map(|r| (r.lead_id.clone(), r)).collect();
        for (id, slot) in lead_ids.iter().zip(out.iter_mut()) {
            if slot.is_none()
                && let Some(row) = rows.get(id)
            {
                *slot = Some(Found {
                    score: row.clone(),
                    origin: Origin::Database,
                });
            }
        }
        Ok(out)
    }
}
