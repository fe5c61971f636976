//! Evaluation: toxicity scorers, the field's metrics, fluency, the baselines, the evaluation
//! run and its report.

pub mod baselines;
pub mod fluency;
pub mod harness;
pub mod metrics;
pub mod options;
pub mod protocol;
pub mod report;
/// The scorer lives at the top ([`crate::score`]): training filters with it too.
pub use crate::score;
