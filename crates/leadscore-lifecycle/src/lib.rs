//! Model lifecycle rules, without I/O.
//!
//! [`retrain`]: when to ask for a new model version. Drift (a feature's or
//! the score's PSI above a threshold for N consecutive hourly windows, or
//! above a higher one in a single window), schedule (weekly in a model's
//! first three months, monthly after) and manual requests become
//! *candidates*; a candidate becomes a `RetrainRequest` only past the gates:
//! the cooldown since the last request, and enough labelled rows in the
//! training data window. Every decision, including "not now, because", is
//! a value the service logs and counts.
//!
//! [`events`]: lifecycle events and what a training run's result means.
//!
//! [`rollout`]: shadow, canary steps, promotion and rollback of a challenger.

pub mod events;
pub mod retrain;
pub mod rollout;
