//! Retries of an HTTP delivery: which answers are worth another attempt, how long to wait
//! (exponential with full jitter, capped, or what the receiver's `Retry-After` asks), and
//! when to give up. Pure: no clock, no I/O; the caller brings the time and the randomness.

use std::time::Duration;

/// What to do after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered.
    Done,
    /// Try again (a 5xx, 408, 429, a timeout or a connection error).
    Retry,
    /// Never retried: the receiver refused the request itself (another 4xx, a 3xx).
    Refused,
}

/// The verdict on an HTTP status; `None` means no answer (timeout, connection refused).
pub fn verdict(status: Option<u16>) -> Verdict {
    match status {
        Some(200..=299) => Verdict::Done,
        None | Some(408 | 425 | 429) | Some(500..=599) => Verdict::Retry,
        Some(_) => Verdict::Refused,
    }
}

/// Exponential backoff with full jitter, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first wait.
    pub initial: Duration,
    /// Largest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1): uniform in
    /// `[0, min(max, initial * 2^(attempt-1))]` by `unit` in [0, 1), or the receiver's
    /// `retry_after` when it asked (capped at `max`).
    pub fn wait(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.max);
        }
        let ceiling = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A `Retry-After` value: delay-seconds, or an HTTP date relative to `now` (past dates are
/// zero). `None` when it is neither.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_server_trouble_and_throttling_are_retried() {
        assert_eq!(verdict(Some(200)), Verdict::Done);
        assert_eq!(verdict(Some(204)), Verdict::Done);
        for s in [500, 502, 503, 504, 429, 408] {
            assert_eq!(verdict(Some(s)), Verdict::Retry, "{s}");
        }
        assert_eq!(verdict(None), Verdict::Retry);
        for s in [400, 401, 403, 404, 410, 422, 301] {
            assert_eq!(verdict(Some(s)), Verdict::Refused, "{s}");
        }
    }

    #[test]
    fn waits_grow_to_the_cap_and_follow_retry_after() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        assert_eq!(b.wait(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(b.wait(4, None, 1.0), Duration::from_millis(800));
        assert_eq!(b.wait(30, None, 1.0), Duration::from_secs(10));
        assert_eq!(b.wait(4, None, 0.5), Duration::from_millis(400));
        assert_eq!(b.wait(4, None, 0.0), Duration::ZERO);
        assert_eq!(
            b.wait(1, Some(Duration::from_secs(3)), 0.9),
            Duration::from_secs(3)
        );
        assert_eq!(
            b.wait(1, Some(Duration::from_secs(3600)), 0.9),
            Duration::from_secs(10),
            "a receiver cannot park a delivery past the cap"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }
}
