//! The lookup's own memory of scores, in front of Redis.
//!
//! Kept current by the live score stream (`leads.scores.v1`, read_committed):
//! every streamed score replaces what is held for its lead, every tombstone
//! marks the lead deleted. Scores read from Redis or Postgres are remembered
//! too, but never over a newer one: entries are ordered by `scored_at` (a
//! tombstone by its record time), so a read that races a streamed update
//! cannot bring back the older score. Every entry expires after a fixed time
//! from its last update, which bounds how stale an answer can be if the
//! stream stops; a bounded number of entries is kept.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use leadscore_cache::CachedScore;

const SHARDS: usize = 16;

/// What the memory knows about a lead.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// Its latest score.
    Score(CachedScore),
    /// The lead was deleted (a tombstone on the stream).
    Deleted,
}

#[derive(Debug)]
struct Slot {
    known: Known,
    /// `scored_at` of the score, or the tombstone's record time (ms).
    at_ms: i64,
    expires: Instant,
}

#[derive(Debug)]
struct Shard {
    map: HashMap<String, Slot>,
    /// When expired entries were last swept out (a full shard sweeps at most
    /// once per sweep interval, not on every insert).
    swept: Instant,
}

/// A bounded, sharded map from lead id to what is known about it.
#[derive(Debug)]
pub struct Memory {
    shards: Vec<RwLock<Shard>>,
    hasher: RandomState,
    per_shard: usize,
    ttl: Duration,
}

impl Memory {
    /// Room for about `entries` leads, each kept `ttl` after its last update;
    /// `None` when `entries` is 0 (no memory).
    pub fn new(entries: usize, ttl: Duration) -> Option<Self> {
        if entries == 0 || ttl.is_zero() {
            return None;
        }
        Some(Self {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        map: HashMap::new(),
                        swept: Instant::now(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            per_shard: entries.div_ceil(SHARDS),
            ttl,
        })
    }

    fn shard(&self, lead_id: &str) -> &RwLock<Shard> {
        let i = self.hasher.hash_one(lead_id) as usize % SHARDS;
        &self.shards[i]
    }

    /// What is known about `lead_id` now; `None` when nothing (or only an expired entry) is held.
    pub fn get(&self, lead_id: &str) -> Option<Known> {
        self.get_at(lead_id, Instant::now())
    }

    fn get_at(&self, lead_id: &str, now: Instant) -> Option<Known> {
        let shard = self.shard(lead_id).read().ok()?;
        shard
            .map
            .get(lead_id)
            .filter(|s| s.expires > now)
            .map(|s| s.known.clone())
    }

    /// A score from the live stream: replaces anything not newer.
    pub fn streamed(&self, score: CachedScore) {
        let (id, at) = (score.lead_id.clone(), score.scored_at_ms);
        self.put(id, Known::Score(score), at, true, Instant::now());
    }

    /// A tombstone from the live stream, with its record time.
    pub fn deleted(&self, lead_id: &str, at_ms: i64) {
        self.put(
            lead_id.to_string(),
            Known::Deleted,
            at_ms,
            true,
            Instant::now(),
        );
    }

    /// A score read from Redis or Postgres: kept unless something as new or newer is held.
    pub fn read(&self, score: &CachedScore) {
        self.put(
            score.lead_id.clone(),
            Known::Score(score.clone()),
            score.scored_at_ms,
            false,
            Instant::now(),
        );
    }

    fn put(&self, id: String, known: Known, at_ms: i64, replace_equal: bool, now: Instant) {
        let Ok(mut shard) = self.shard(&id).write() else {
            return;
        };
        if let Some(held) = shard.map.get(&id)
            && held.expires > now
            && (held.at_ms > at_ms || (held.at_ms == at_ms && !replace_equal))
        {
            return;
        }
        if shard.map.len() >= self.per_shard && !shard.map.contains_key(&id) {
            // Sweeping is a scan of the shard: at most once per sweep interval.
            if now.saturating_duration_since(shard.swept) >= self.sweep_every() {
                shard.map.retain(|_, s| s.expires > now);
                shard.swept = now;
            }
            if shard.map.len() >= self.per_shard
                && let Some(victim) = shard.map.keys().next().cloned()
            {
                shard.map.remove(&victim);
            }
        }
        shard.map.insert(
            id,
            Slot {
                known,
                at_ms,
                expires: now + self.ttl,
            },
        );
    }

    /// How often a full shard may scan itself for expired entries.
    fn sweep_every(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(100))
    }

    /// Entries held (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().map(|m| m.map.len()).unwrap_or(0))
            .sum()
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(id: &str, s: f64, at: i64) -> CachedScore {
        CachedScore {
            lead_id: id.into(),
            score: s,
            band: "Low".into(),
            model_name: "m".into(),
            model_version: "1".into(),
            model_role: "champion".into(),
            scored_at_ms: at,
            reasons: Default::default(),
        }
    }

    fn memory() -> Memory {
        Memory::new(1_000, Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn no_room_means_no_memory() {
        assert!(Memory::new(0, Duration::from_secs(1)).is_none());
        assert!(Memory::new(10, Duration::ZERO).is_none());
    }

    #[test]
    fn the_stream_replaces_what_is_held() {
        let m = memory();
        m.streamed(score("a", 0.1, 10));
        m.streamed(score("a", 0.9, 20));
        assert_eq!(m.get("a"), Some(Known::Score(score("a", 0.9, 20))));
        // A re-score at the same instant is the stream's latest word too.
        m.streamed(score("a", 0.5, 20));
        assert_eq!(m.get("a"), Some(Known::Score(score("a", 0.5, 20))));
        assert_eq!(m.get("b"), None);
    }

    #[test]
    fn a_read_never_brings_back_an_older_score_or_a_deleted_lead() {
        let m = memory();
        m.streamed(score("a", 0.9, 20));
        m.read(&score("a", 0.1, 10)); // read from Redis before the update landed there
        m.read(&score("a", 0.2, 20)); // same time: the stream's value stays
        assert_eq!(m.get("a"), Some(Known::Score(score("a", 0.9, 20))));
        m.deleted("a", 25);
        m.read(&score("a", 0.9, 20));
        assert_eq!(m.get("a"), Some(Known::Deleted));
        // Scored again after the deletion (the lead came back): newer wins.
        m.read(&score("a", 0.3, 30));
        assert_eq!(m.get("a"), Some(Known::Score(score("a", 0.3, 30))));
    }

    #[test]
    fn the_stream_never_goes_back_in_time_either() {
        let m = memory();
        m.read(&score("a", 0.7, 50));
        m.streamed(score("a", 0.1, 40)); // a late record of an older scoring
        assert_eq!(m.get("a"), Some(Known::Score(score("a", 0.7, 50))));
    }

    #[test]
    fn entries_expire_and_then_anything_replaces_them() {
        let m = Memory::new(100, Duration::from_millis(50)).unwrap();
        let t0 = Instant::now();
        m.put("a".into(), Known::Score(score("a", 0.9, 20)), 20, true, t0);
        assert!(m.get_at("a", t0 + Duration::from_millis(10)).is_some());
        let later = t0 + Duration::from_millis(60);
        assert_eq!(m.get_at("a", later), None);
        m.put(
            "a".into(),
            Known::Score(score("a", 0.1, 10)),
            10,
            false,
            later,
        );
        assert_eq!(
            m.get_at("a", later),
            Some(Known::Score(score("a", 0.1, 10)))
        );
    }

    #[test]
    fn the_number_of_entries_is_bounded() {
        let m = Memory::new(160, Duration::from_secs(60)).unwrap();
        for i in 0..10_000 {
            m.streamed(score(&format!("lead-{i}"), 0.5, i));
        }
        assert!(m.len() <= 160, "{} entries held", m.len());
        assert!(m.len() >= 100, "eviction removed too much: {}", m.len());
        // The latest insert is always held.
        assert!(m.get("lead-9999").is_some());
    }
}
