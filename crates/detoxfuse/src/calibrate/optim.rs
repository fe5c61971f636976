//! AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule and global
//! gradient-norm clipping. The optimizer state is plain tensors so checkpoints can hold it.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps of linear warmup from 0 to `lr`.
    pub warmup: usize,
    /// Total steps; after warmup the rate follows a cosine down to `min_lr_ratio × lr`.
    pub total_steps: usize,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub clip: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup: 20,
            total_steps: 1000,
            min_lr_ratio: 0.1,
            clip: 1.0,
        }
    }
}

impl AdamWConfig {
    /// The learning rate for 0-based step `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// AdamW moments for each trainable parameter, keyed by parameter name.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates applied so far.
    pub step: usize,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, vars: &BTreeMap<String, Var>) -> Result<Self> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in vars {
            m.insert(name.clone(), var.as_tensor().zeros_like()?);
            v.insert(name.clone(), var.as_tensor().zeros_like()?);
        }
        Ok(Self {
            config,
            step: 0,
            m,
            v,
        })
    }

    /// Applies one update. Parameters without a gradient are left alone (and reported by
    /// [`missing_grads`]).
    pub fn step(&mut self, vars: &BTreeMap<String, Var>, grads: &GradStore) -> Result<StepInfo> {
        let c = self.config;
        let mut sq = 0.0f64;
        for var in vars.values() {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        let norm = sq.sqrt();
        let clip = if c.clip > 0.0 && norm > c.clip {
            c.clip / norm
        } else {
            1.0
        };
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // candle's gradients still carry their backward graph (and through it the step's
            // activations); the moments must not, or every step's graph stays alive.
            let g = (g.detach() * clip)?;
            let m = ((&self.m[name] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[name] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let w = var.as_tensor();
            // No decay on gains (1-D tensors such as RMSNorm weights).
            let decay = if w.rank() > 1 { c.weight_decay } else { 0.0 };
            let new = ((w.detach() * (1.0 - lr * decay))? - (update * lr)?)?;
            var.set(&new)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(StepInfo {
            lr,
            grad_norm: norm,
        })
    }
}

/// Names of trainable parameters that received no gradient, or an all-zero one.
pub fn missing_grads(vars: &BTreeMap<String, Var>, grads: &GradStore) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, var) in vars {
        let zero = match grads.get(var.as_tensor()) {
            None => true,
            Some(g) => {
                g.abs()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?
                    == 0.0
            }
        };
        if zero {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}
