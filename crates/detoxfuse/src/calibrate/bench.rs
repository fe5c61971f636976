//! Training speed: full optimizer steps (forward, head, backward, AdamW) on a fixed batch.

use std::time::Instant;

use candle_core::Device;

use super::model::{Batch, CalibrationModel};
use super::optim::{AdamW, AdamWConfig};
use crate::error::Result;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSpeed {
    pub rows: usize,
    pub len: usize,
    pub layers: usize,
    pub step_seconds: f64,
    pub tokens_per_s: f64,
    /// Peak resident memory of this process (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

/// The batch `bench train` uses (the PyTorch script builds the same ids).
pub fn synthetic_batch(rows: usize, len: usize) -> Result<Batch> {
    let ids: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..len)
                .map(|i| ((r * 7919 + i * 104_729) % 49_000) as u32 + 10)
                .collect()
        })
        .collect();
    let mask = vec![true; len];
    let rr: Vec<(&[u32], &[bool])> = ids
        .iter()
        .map(|r| (r.as_slice(), mask.as_slice()))
        .collect();
    Batch::new(&rr, 0, &Device::Cpu)
}

/// Median seconds per training step over `steps` steps after one warm-up step.
pub fn measure(
    model: &CalibrationModel,
    rows: usize,
    len: usize,
    steps: usize,
) -> Result<TrainSpeed> {
    let batch = synthetic_batch(rows, len)?;
    let mut opt = AdamW::new(AdamWConfig::default(), model.vars())?;
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = Instant::now();
        let (_, grads) = model.loss_and_grads(&batch)?;
        opt.step(model.vars(), &grads)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    Ok(TrainSpeed {
        rows,
        len,
        layers: model.config.num_hidden_layers,
        step_seconds: med,
        tokens_per_s: (rows * len) as f64 / med,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// VmHWM from /proc/self/status (0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
