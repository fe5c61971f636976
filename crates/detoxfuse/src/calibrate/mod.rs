//! Step 1 of the method: the calibration model, its training corpus and its trainer.

pub mod model;
pub mod ops;
pub mod optim;
pub mod data;
pub mod train;
pub mod corpus;
pub mod probe;
pub mod bench;
