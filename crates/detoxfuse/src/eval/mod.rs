//! Evaluation: toxicity scorers and the field's metrics (fluency, sweeps and reports to come).

pub mod fluency;
pub mod metrics;
pub mod score;
