//! Evaluation: toxicity scorers, the field's metrics, fluency, the baselines, the evaluation
//! run and its report.

pub mod baselines;
pub mod fluency;
pub mod harness;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod score;
