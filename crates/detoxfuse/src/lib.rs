//! detoxfuse: make an LLM's generations less toxic by output-layer fusion with a calibration
//! model (arXiv 2506.01266), without retraining the LLM.
//!
//! Modules follow the method's own words: [`lm`] loads causal LMs split before their LM head,
//! [`text`] tokenizes, [`generate`] samples; `calibrate`, `align`, `fuse` and `eval` build on
//! them.

pub mod align;
pub mod atomic;
pub mod batch;
pub mod bench;
pub mod calibrate;
pub mod calibration;
pub mod error;
pub mod eval;
pub mod expf;
pub mod fetch;
pub mod fuse;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod jsonl;
pub mod lm;
pub mod openai;
pub mod recipes;
pub mod sample;
pub mod score;
pub mod serving;
pub mod text;

pub use error::{Error, Result};
