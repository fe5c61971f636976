//! Step 1 of the method: the calibration model, its training corpus and its trainer.

pub mod bench;
pub mod checkpoint;
pub mod corpus;
pub mod data;
pub mod fused;
pub mod guard;
pub mod lens;
pub mod model;
pub mod ops;
pub mod optim;
pub mod options;
pub mod prepare;
pub mod probe;
pub mod selfgen;
pub mod train;
