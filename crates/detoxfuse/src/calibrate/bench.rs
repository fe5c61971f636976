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
    crate::bench::proc_status_mib("VmHWM")
}

/// What `detoxfuse bench train` reports: our training speed and PyTorch's on the same
/// architecture and batch, when a Python with torch and transformers is found.
pub struct TrainComparison {
    pub ours: TrainSpeed,
    /// PyTorch's figures (`tokens_per_s`, `step_seconds`, `peak_rss_mib`, `torch`), or why
    /// they are missing.
    pub torch: std::result::Result<serde_json::Value, String>,
}

impl TrainComparison {
    /// Measures `layers` layers of the base at `base` on a `rows × len` batch, median of
    /// `steps` steps, then the same in PyTorch under `torch_python` (default:
    /// `.venv-torch/bin/python` if present, else `python3` if it imports torch).
    pub fn measure(
        base: &std::path::Path,
        layers: usize,
        (rows, len, steps): (usize, usize, usize),
        torch_python: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let b = super::train::Base::load(base, layers)?;
        let model = b.init(layers, super::model::Trainable::default())?;
        drop(b);
        let ours = measure(&model, rows, len, steps)?;
        let py = torch_python.or_else(|| {
            let venv = std::path::PathBuf::from(".venv-torch/bin/python");
            if venv.exists() {
                return Some(venv);
            }
            let ok = std::process::Command::new("python3")
                .args(["-c", "import torch, transformers"])
                .output()
                .is_ok_and(|o| o.status.success());
            ok.then(|| "python3".into())
        });
        let torch = match py {
            None => Err("not measured: no Python with torch + transformers (see scripts/bench_train_torch.py)".into()),
            Some(py) => crate::bench::torch_train_speed(
                &py,
                rows,
                len,
                layers,
                steps,
                crate::bench::threads(),
            )
            .map_err(|e| e.to_string()),
        };
        Ok(Self { ours, torch })
    }
}

/// One line for ours, one for PyTorch's (or why it is missing) and their ratio.
impl std::fmt::Display for TrainComparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.ours;
        write!(
            f,
            "detoxfuse  {:>8.1} tok/s  {:>6.2} s/step  peak RSS {:>6.0} MiB",
            o.tokens_per_s, o.step_seconds, o.peak_rss_mib
        )?;
        let v = match &self.torch {
            Err(why) => return write!(f, "\npytorch    {why}"),
            Ok(v) => v,
        };
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        write!(
            f,
            "\npytorch    {:>8.1} tok/s  {:>6.2} s/step  peak RSS {:>6.0} MiB  (torch {})\nratio      {:.2}x PyTorch (tokens/s)",
            num("tokens_per_s"),
            num("step_seconds"),
            num("peak_rss_mib"),
            v["torch"].as_str().unwrap_or("?"),
            o.tokens_per_s / num("tokens_per_s")
        )
    }
}
