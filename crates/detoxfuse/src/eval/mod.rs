//! Evaluation: toxicity scorers (and, to come, the field's metrics, fluency and reports).

pub mod score;
