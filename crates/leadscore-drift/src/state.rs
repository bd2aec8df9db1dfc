//! The drift service's window state, in two stages, both serialisable so a
//! checkpoint can hold them next to the input offsets.
//!
//! Stage one, [`SourceState`], is the state of one input partition: its
//! watermark (highest event time seen), the open windows of each model
//! version and the late events. When the watermark minus the allowed
//! lateness passes a window's end, the window is released as a [`Partial`]
//! (a partial aggregate). A partition that has had nothing to read for a
//! while says so (`idle`), so it does not hold the others back.
//!
//! Stage two, [`Merger`], adds the partials of every input partition. A
//! window is complete once every active partition's horizon has passed its
//! end; then it is reported, together with the daily and weekly roll-ups
//! whose ends have been passed too. Partials that arrive for a window that
//! was already reported count as late events of that model version's next
//! report. Because partial counts add exactly, any split of the partitions
//! over instances gives the same reports as one instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use leadscore_features::RawValue;
use serde::{Deserialize, Serialize};

use crate::alerts::AlertState;
use crate::{Counts, Profile, window_start};

/// Reference profiles by model version.
pub type Profiles = BTreeMap<String, Arc<Profile>>;

/// Format version of [`Partial`] and of the checkpoints.
pub const FORMAT: u32 = 1;

/// What happened to an observed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Counted in its window.
    Counted,
    /// Its window was already released: counted as late only.
    Late,
    /// No profile for its model version: not counted.
    Unprofiled,
}

/// One window's counts in a partial aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialWindow {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Window start, ms.
    pub start_ms: i64,
    /// Counts.
    pub counts: Counts,
    /// Events that came after the window was released.
    pub late: u64,
}

/// What one input partition sends the merger when its horizon moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// The input partition, `topic/partition`.
    pub source: String,
    /// Windows starting before this are released (complete for this source).
    pub horizon_ms: Option<i64>,
    /// Nothing to read for a while: does not hold back completion.
    pub idle: bool,
    /// Released windows and late counts.
    pub windows: Vec<PartialWindow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Open {
    model_name: String,
    counts: Counts,
    late: u64,
}

/// Stage one: the state of one input partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceState {
    /// Format version ([`FORMAT`]).
    #[serde(default)]
    pub format: u32,
    /// Next offset to read (the checkpoint's position).
    pub next_offset: Option<i64>,
    /// Highest event time seen, ms.
    pub watermark: Option<i64>,
    /// Windows starting before this have been released.
    pub horizon: Option<i64>,
    /// Whether this source last said it was idle.
    pub idle: bool,
    /// Open windows: model version -> window start -> counts.
    open: BTreeMap<String, BTreeMap<i64, Open>>,
    /// Late events for released windows, not yet sent: version -> start -> (model name, count).
    late: BTreeMap<String, BTreeMap<i64, (String, u64)>>,
}

/// A scored lead, as the drift service reads it.
#[derive(Debug, Clone, Copy)]
pub struct ScoreEvent<'a> {
    /// Model name.
    pub model_name: &'a str,
    /// Model version.
    pub model_version: &'a str,
    /// Event time, ms.
    pub event_ms: i64,
    /// Feature values by name.
    pub features: &'a BTreeMap<String, RawValue>,
    /// Score.
    pub score: f64,
    /// Event-to-score latency, ms.
    pub latency_ms: f64,
}

/// A shadow score next to the live score it shadows.
#[derive(Debug, Clone, Copy)]
pub struct ShadowEvent<'a> {
    /// Live model name.
    pub model_name: &'a str,
    /// Live model version (the window the pair is counted in).
    pub model_version: &'a str,
    /// Shadow model version.
    pub shadow_version: &'a str,
    /// Event time, ms.
    pub event_ms: i64,
    /// Live score.
    pub live: f64,
    /// Shadow score.
    pub shadow: f64,
    /// Whether both are in the same band.
    pub same_band: bool,
    /// Whether both name the same feature first among their reasons; `None` when either
    /// carried none.
    pub same_top_reason: Option<bool>,
}

impl SourceState {
    fn advance(&mut self, event_ms: i64) {
        self.idle = false;
        self.watermark = Some(self.watermark.map_or(event_ms, |w| w.max(event_ms)));
    }

    /// The open window for an event, or `Late` / `Unprofiled`.
    fn slot<'a>(
        &'a mut self,
        profiles: &'a Profiles,
        size_ms: i64,
        model_name: &str,
        model_version: &str,
        event_ms: i64,
    ) -> Result<(&'a mut Open, &'a Profile), Observed> {
        let Some(profile) = profiles.get(model_version) else {
            return Err(Observed::Unprofiled);
        };
        let start = window_start(event_ms, size_ms);
        if self.horizon.is_some_and(|h| start < h) {
            let entry = self
                .late
                .entry(model_version.to_string())
                .or_default()
                .entry(start)
                .or_insert_with(|| (model_name.to_string(), 0));
            entry.1 += 1;
            return Err(Observed::Late);
        }
        let open = self
            .open
            .entry(model_version.to_string())
            .or_default()
            .entry(start)
            .or_insert_with(|| Open {
                model_name: model_name.to_string(),
                counts: Counts::new(profile),
                late: 0,
            });
        Ok((open, profile))
    }

    /// Counts a scored lead in its window of `size_ms`.
    pub fn observe_score(
        &mut self,
        profiles: &Profiles,
        size_ms: i64,
        e: &ScoreEvent<'_>,
    ) -> Observed {
        self.advance(e.event_ms);
        match self.slot(profiles, size_ms, e.model_name, e.model_version, e.event_ms) {
            Ok((open, profile)) => {
                open.counts.observe(profile, e.features, e.score);
                open.counts.latency.add(e.latency_ms);
                Observed::Counted
            }
            Err(o) => o,
        }
    }

    /// Counts a shadow pair in its live version's window of `size_ms`.
    pub fn observe_shadow(
        &mut self,
        profiles: &Profiles,
        size_ms: i64,
        e: &ShadowEvent<'_>,
    ) -> Observed {
        self.advance(e.event_ms);
        match self.slot(profiles, size_ms, e.model_name, e.model_version, e.event_ms) {
            Ok((open, _)) => {
                open.counts.observe_shadow(
                    e.shadow_version,
                    e.live,
                    e.shadow,
                    e.same_band,
                    e.same_top_reason,
                );
                Observed::Counted
            }
            Err(o) => o,
        }
    }

    /// Counts a lead `model_version` failed on (a candidate's error) in its window of `size_ms`.
    pub fn observe_error(
        &mut self,
        profiles: &Profiles,
        size_ms: i64,
        model_name: &str,
        model_version: &str,
        event_ms: i64,
    ) -> Observed {
        self.advance(event_ms);
        match self.slot(profiles, size_ms, model_name, model_version, event_ms) {
            Ok((open, _)) => {
                open.counts.errors += 1;
                Observed::Counted
            }
            Err(o) => o,
        }
    }

    /// Releases the windows the watermark (minus `lateness_ms`) has passed,
    /// and late counts; `None` when there is nothing new to say.
    pub fn release(&mut self, source: &str, size_ms: i64, lateness_ms: i64) -> Option<Partial> {
        let wm = self.watermark?;
        let horizon = window_start(wm.saturating_sub(lateness_ms.max(0)), size_ms);
        let moved = self.horizon.is_none_or(|h| horizon > h);
        if !moved && self.late.is_empty() {
            return None;
        }
        if moved {
            self.horizon = Some(horizon);
        }
        let mut windows = Vec::new();
        for (version, starts) in &mut self.open {
            let keep = starts.split_off(&horizon);
            let released = std::mem::replace(starts, keep);
            windows.extend(released.into_iter().map(|(start, o)| PartialWindow {
                model_name: o.model_name,
                model_version: version.clone(),
                start_ms: start,
                counts: o.counts,
                late: o.late,
            }));
        }
        self.open.retain(|_, starts| !starts.is_empty());
        for (version, starts) in std::mem::take(&mut self.late) {
            for (start, (model_name, n)) in starts {
                windows.push(PartialWindow {
                    model_name,
                    model_version: version.clone(),
                    start_ms: start,
                    counts: Counts {
                        scored: 0,
                        features: Vec::new(),
                        score: None,
                        latency: Default::default(),
                        shadow: BTreeMap::new(),
                        errors: 0,
                    },
                    late: n,
                });
            }
        }
        Some(Partial {
            format: FORMAT,
            source: source.to_string(),
            horizon_ms: self.horizon,
            idle: false,
            windows,
        })
    }

    /// Marks the source idle: it has nothing left to read. Its open windows
    /// are released as they are (more records for them later are released
    /// again and merged, or counted late if the window was reported), so an
    /// idle source never withholds counts. `None` if it was already idle.
    pub fn mark_idle(&mut self, source: &str) -> Option<Partial> {
        if self.idle {
            return None;
        }
        self.idle = true;
        let mut windows = Vec::new();
        for (version, starts) in std::mem::take(&mut self.open) {
            windows.extend(starts.into_iter().map(|(start, o)| PartialWindow {
                model_name: o.model_name,
                model_version: version.clone(),
                start_ms: start,
                counts: o.counts,
                late: o.late,
            }));
        }
        Some(Partial {
            format: FORMAT,
            source: source.to_string(),
            horizon_ms: self.horizon,
            idle: true,
            windows,
        })
    }

    /// Scores counted in open windows.
    pub fn open_scored(&self) -> u64 {
        self.open
            .values()
            .flat_map(|s| s.values())
            .map(|o| o.counts.scored)
            .sum()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Mark {
    horizon: Option<i64>,
    idle: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pending {
    model_name: String,
    counts: Option<Counts>,
    late: u64,
}

/// A window complete across every input partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// Window length, ms.
    pub size_ms: i64,
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Start, ms.
    pub start_ms: i64,
    /// End (exclusive), ms.
    pub end_ms: i64,
    /// Merged counts (`None` when only late events arrived).
    pub counts: Option<Counts>,
    /// Late events: this window's own, and those of earlier reported windows of the version.
    pub late: u64,
}

/// Stage two: merges every partition's partials into complete windows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Merger {
    /// Format version ([`FORMAT`]).
    #[serde(default)]
    pub format: u32,
    /// Next offset to read on the partials topic.
    pub next_offset: Option<i64>,
    marks: BTreeMap<String, Mark>,
    /// size -> version -> start -> pending.
    pending: BTreeMap<i64, BTreeMap<String, BTreeMap<i64, Pending>>>,
    /// size -> windows starting before this were reported.
    reported_before: BTreeMap<i64, i64>,
    /// size -> version -> late events for already reported windows.
    carry_late: BTreeMap<i64, BTreeMap<String, u64>>,
    /// Alerts firing now.
    pub alerts: AlertState,
    /// Reported windows whose outcomes are still to be summarised.
    #[serde(default)]
    pub awaiting_outcomes: Vec<AwaitingOutcomes>,
}

/// A reported window waiting for its leads' outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AwaitingOutcomes {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Window start, ms.
    pub start_ms: i64,
    /// Window end, ms.
    pub end_ms: i64,
    /// Wall-clock time (ms) from which to summarise.
    pub due_ms: i64,
}

impl Merger {
    /// Adds one partial; `sizes` are the window lengths (the base first, then roll-ups).
    pub fn add(&mut self, partial: Partial, sizes: &[i64]) -> crate::Result<()> {
        let mark = self.marks.entry(partial.source).or_default();
        mark.idle = partial.idle;
        if partial.horizon_ms.is_some() {
            mark.horizon = partial.horizon_ms.max(mark.horizon);
        }
        for w in partial.windows {
            for &size in sizes {
                let start = window_start(w.start_ms, size);
                if self.reported_before.get(&size).is_some_and(|r| start < *r) {
                    *self
                        .carry_late
                        .entry(size)
                        .or_default()
                        .entry(w.model_version.clone())
                        .or_default() += w.counts.scored + w.late;
                    continue;
                }
                let p = self
                    .pending
                    .entry(size)
                    .or_default()
                    .entry(w.model_version.clone())
                    .or_default()
                    .entry(start)
                    .or_insert_with(|| Pending {
                        model_name: w.model_name.clone(),
                        counts: None,
                        late: 0,
                    });
                p.late += w.late;
                if w.counts.scored > 0 || !w.counts.shadow.is_empty() || w.counts.errors > 0 {
                    match &mut p.counts {
                        Some(c) => c.merge(&w.counts)?,
                        None => p.counts = Some(w.counts.clone()),
                    }
                }
            }
        }
        Ok(())
    }

    /// The horizon every expected source has passed; `None` while some source has not spoken.
    ///
    /// Idle sources do not hold it back; when every source is idle it is the highest horizon.
    pub fn horizon(&self, sources: &[String]) -> Option<i64> {
        let mut active: Option<i64> = None;
        let mut any_active = false;
        let mut highest: Option<i64> = None;
        for s in sources {
            let m = self.marks.get(s)?;
            highest = highest.max(m.horizon);
            if !m.idle {
                let h = m.horizon?;
                any_active = true;
                active = Some(active.map_or(h, |a| a.min(h)));
            }
        }
        if any_active { active } else { highest }
    }

    /// Takes the windows of every size that are complete across `sources`, oldest first.
    pub fn complete(&mut self, sources: &[String], sizes: &[i64]) -> Vec<Completed> {
        let Some(horizon) = self.horizon(sources) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &size in sizes {
            let done_before = window_start(horizon, size);
            let before = self.reported_before.entry(size).or_insert(done_before);
            *before = (*before).max(done_before);
            let Some(versions) = self.pending.get_mut(&size) else {
                continue;
            };
            for (version, starts) in versions.iter_mut() {
                let keep = starts.split_off(&done_before);
                let ready = std::mem::replace(starts, keep);
                let mut carry = self
                    .carry_late
                    .get_mut(&size)
                    .and_then(|c| c.remove(version))
                    .unwrap_or(0);
                for (start, p) in ready {
                    out.push(Completed {
                        size_ms: size,
                        model_name: p.model_name,
                        model_version: version.clone(),
                        start_ms: start,
                        end_ms: start + size,
                        counts: p.counts,
                        late: p.late + std::mem::take(&mut carry),
                    });
                }
                if carry > 0 {
                    // Nothing to report it with yet: keep it for the next window.
                    *self
                        .carry_late
                        .entry(size)
                        .or_default()
                        .entry(version.clone())
                        .or_default() += carry;
                }
            }
            versions.retain(|_, s| !s.is_empty());
        }
        out.sort_by(|a, b| {
            (a.size_ms, a.start_ms, &a.model_version).cmp(&(
                b.size_ms,
                b.start_ms,
                &b.model_version,
            ))
        });
        out
    }

    /// Takes the windows whose outcomes are due at `now_ms`.
    pub fn due_outcomes(&mut self, now_ms: i64) -> Vec<AwaitingOutcomes> {
        let (due, later) = std::mem::take(&mut self.awaiting_outcomes)
            .into_iter()
            .partition(|a| a.due_ms <= now_ms);
        self.awaiting_outcomes = later;
        due
    }

    /// Windows waiting for partitions, over every size.
    pub fn pending_windows(&self) -> usize {
        self.pending
            .values()
            .flat_map(|v| v.values())
            .map(BTreeMap::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn profiles() -> Profiles {
        let text = include_str!("../../../models/default/metadata.json");
        let metadata: serde_json::Value = serde_json::from_str(text).unwrap();
        let p = Arc::new(Profile::from_metadata(&metadata).unwrap());
        BTreeMap::from([("1".to_string(), p)])
    }

    fn features(i: u64) -> BTreeMap<String, RawValue> {
        BTreeMap::from([
            ("page_views".to_string(), RawValue::Long((i % 40) as i64)),
            (
                "industry".to_string(),
                RawValue::String(["Technology", "Retail", "Finance"][(i % 3) as usize].into()),
            ),
        ])
    }

    fn score(state: &mut SourceState, p: &Profiles, version: &str, t: i64, i: u64) -> Observed {
        let f = features(i);
        state.observe_score(
            p,
            1000,
            &ScoreEvent {
                model_name: "lead-scoring",
                model_version: version,
                event_ms: t,
                features: &f,
                score: (i % 100) as f64 / 100.0,
                latency_ms: 5.0 + (i % 7) as f64,
            },
        )
    }

    #[test]
    fn a_source_releases_windows_its_watermark_has_passed_and_counts_late_events() {
        let p = profiles();
        let mut s = SourceState::default();
        assert_eq!(score(&mut s, &p, "1", 500, 1), Observed::Counted);
        assert_eq!(score(&mut s, &p, "9", 600, 1), Observed::Unprofiled);
        assert!(
            s.release("t/0", 1000, 100)
                .is_some_and(|p| p.windows.is_empty())
        );
        assert!(s.release("t/0", 1000, 100).is_none(), "nothing new");
        score(&mut s, &p, "1", 1050, 2);
        assert!(
            s.release("t/0", 1000, 100).is_none(),
            "lateness holds window 0"
        );
        score(&mut s, &p, "1", 1100, 3);
        let partial = s.release("t/0", 1000, 100).unwrap();
        assert_eq!(partial.horizon_ms, Some(1000));
        assert_eq!(partial.windows.len(), 1);
        assert_eq!(partial.windows[0].start_ms, 0);
        assert_eq!(partial.windows[0].counts.scored, 1);
        assert_eq!(score(&mut s, &p, "1", 999, 4), Observed::Late);
        let partial = s.release("t/0", 1000, 100).unwrap();
        assert_eq!(partial.windows[0].late, 1);
        assert_eq!(s.open_scored(), 2);
        // Idle is said once, and cleared by the next record.
        assert!(s.mark_idle("t/0").is_some_and(|p| p.idle));
        assert!(s.mark_idle("t/0").is_none());
        score(&mut s, &p, "1", 1200, 5);
        assert!(!s.idle);
    }

    #[test]
    fn a_checkpointed_source_continues_as_if_never_stopped() {
        let p = profiles();
        let mut whole = SourceState::default();
        let mut resumed = SourceState::default();
        for i in 0..300u64 {
            let t = (i * 37) as i64 % 5000 + (i as i64) * 3;
            score(&mut whole, &p, "1", t, i);
            score(&mut resumed, &p, "1", t, i);
            if i % 50 == 0 {
                assert_eq!(
                    whole.release("t/0", 1000, 200),
                    resumed.release("t/0", 1000, 200)
                );
                let text = serde_json::to_string(&resumed).unwrap();
                resumed = serde_json::from_str(&text).unwrap();
            }
        }
        assert_eq!(whole, resumed);
    }

    #[test]
    fn a_candidates_errors_complete_a_window_of_its_own_version_across_sources() {
        let mut p = profiles();
        p.insert("2".into(), p["1"].clone());
        let names = ["t/0".to_string(), "t/1".to_string()];
        let mut states = [SourceState::default(), SourceState::default()];
        for i in 0..10u64 {
            let k = (i % 2) as usize;
            score(&mut states[k], &p, "1", 100 + i as i64, i);
            let o = states[k].observe_error(&p, 1000, "lead-scoring", "2", 100 + i as i64);
            assert_eq!(o, Observed::Counted);
        }
        assert_eq!(
            states[0].observe_error(&p, 1000, "lead-scoring", "9", 150),
            Observed::Unprofiled
        );
        let mut merger = Merger::default();
        for (k, s) in states.iter_mut().enumerate() {
            score(s, &p, "1", 1500, 99);
            let text = serde_json::to_string(&*s).unwrap();
            *s = serde_json::from_str(&text).unwrap();
            merger
                .add(s.release(&names[k], 1000, 0).unwrap(), &[1000])
                .unwrap();
        }
        let done = merger.complete(&names, &[1000]);
        let by_version = |v: &str| {
            done.iter()
                .find(|c| c.model_version == v && c.start_ms == 0)
                .and_then(|c| c.counts.clone())
                .unwrap()
        };
        let candidate = by_version("2");
        assert_eq!((candidate.errors, candidate.scored), (10, 0));
        let champion = by_version("1");
        assert_eq!((champion.errors, champion.scored), (0, 10));
    }

    fn run(sources: &[&str], split: &dyn Fn(u64) -> usize) -> Vec<Completed> {
        let p = profiles();
        let names: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        let mut states = vec![SourceState::default(); sources.len()];
        let mut merger = Merger::default();
        let sizes = [1000, 4000];
        let mut out = Vec::new();
        for i in 0..2000u64 {
            let k = split(i);
            let t = i as i64 * 5 + (i % 13) as i64 * 40;
            score(&mut states[k], &p, "1", t, i);
            if i % 97 == 0 {
                for (k, s) in states.iter_mut().enumerate() {
                    // Lateness above the disorder of the stream (480 ms): nothing is late.
                    if let Some(partial) = s.release(&names[k], 1000, 500) {
                        merger.add(partial, &sizes).unwrap();
                    }
                }
                out.extend(merger.complete(&names, &sizes));
            }
        }
        out
    }

    #[test]
    fn partitions_merge_to_the_same_reports_as_one_source() {
        let one = run(&["t/0"], &|_| 0);
        let three = run(&["t/0", "t/1", "t/2"], &|i| (i % 3) as usize);
        assert!(!one.is_empty());
        assert!(
            one.iter().any(|c| c.size_ms == 4000),
            "roll-ups are reported"
        );
        // Three sources complete a window only when the slowest has passed it,
        // so compare the windows both completed.
        let common: Vec<&Completed> = one
            .iter()
            .filter(|c| {
                three
                    .iter()
                    .any(|d| (d.size_ms, d.start_ms) == (c.size_ms, c.start_ms))
            })
            .collect();
        assert!(common.len() >= one.len() - 2);
        for c in common {
            let d = three
                .iter()
                .find(|d| (d.size_ms, d.start_ms) == (c.size_ms, c.start_ms))
                .unwrap();
            assert_eq!(c.counts, d.counts, "window {} of {}", c.start_ms, c.size_ms);
        }
    }

    #[test]
    fn a_silent_source_holds_windows_back_until_it_is_idle() {
        let p = profiles();
        let names = vec!["t/0".to_string(), "t/1".to_string()];
        let mut a = SourceState::default();
        let mut b = SourceState::default();
        let mut m = Merger::default();
        score(&mut a, &p, "1", 100, 1);
        score(&mut a, &p, "1", 2500, 2);
        m.add(a.release("t/0", 1000, 0).unwrap(), &[1000]).unwrap();
        assert!(m.complete(&names, &[1000]).is_empty(), "t/1 has not spoken");
        m.add(b.mark_idle("t/1").unwrap(), &[1000]).unwrap();
        let done = m.complete(&names, &[1000]);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].counts.as_ref().unwrap().scored, 1);
        // t/1 wakes up with an event for the reported window: late, reported with the next one.
        score(&mut b, &p, "1", 500, 3);
        score(&mut b, &p, "1", 3000, 4);
        m.add(b.release("t/1", 1000, 0).unwrap(), &[1000]).unwrap();
        score(&mut a, &p, "1", 3100, 5);
        m.add(a.release("t/0", 1000, 0).unwrap(), &[1000]).unwrap();
        let done = m.complete(&names, &[1000]);
        assert_eq!(done.iter().map(|c| c.late).sum::<u64>(), 1);
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Merger>(&text).unwrap(), m);
    }
}

#[cfg(test)]
mod shadow_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn shadow_pairs_of_another_partition_reach_the_window_report() {
        let text = include_str!("../../../models/default/metadata.json");
        let metadata: serde_json::Value = serde_json::from_str(text).unwrap();
        let p = Arc::new(Profile::from_metadata(&metadata).unwrap());
        let profiles = BTreeMap::from([("1".to_string(), p.clone())]);
        let names = vec!["s/0".to_string(), "h/0".to_string()];
        let (mut scores, mut shadow, mut m) = (
            SourceState::default(),
            SourceState::default(),
            Merger::default(),
        );
        let f = BTreeMap::new();
        for t in [100, 200, 2100] {
            scores.observe_score(
                &profiles,
                1000,
                &ScoreEvent {
                    model_name: "m",
                    model_version: "1",
                    event_ms: t,
                    features: &f,
                    score: 0.5,
                    latency_ms: 1.0,
                },
            );
            shadow.observe_shadow(
                &profiles,
                1000,
                &ShadowEvent {
                    model_name: "m",
                    model_version: "1",
                    shadow_version: "2",
                    event_ms: t,
                    live: 0.5,
                    shadow: 0.6,
                    same_band: true,
                    same_top_reason: Some(t % 2 == 0),
                },
            );
        }
        let a = shadow.release("h/0", 1000, 0).unwrap();
        let text = serde_json::to_string(&a).unwrap();
        m.add(serde_json::from_str(&text).unwrap(), &[1000])
            .unwrap();
        m.add(scores.release("s/0", 1000, 0).unwrap(), &[1000])
            .unwrap();
        let done = m.complete(&names, &[1000]);
        assert_eq!(done.len(), 1);
        let w = crate::Window::from_counts(p, done[0].counts.clone().unwrap()).unwrap();
        let s = w.shadow().unwrap();
        assert_eq!(s.pairs, 2);
        assert!((s.mean_abs_diff - 0.1).abs() < 1e-9);
    }
}
