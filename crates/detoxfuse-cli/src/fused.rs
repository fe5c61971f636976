//! `detoxfuse calibrate --recipe fused`: options and printing around
//! [`detoxfuse::calibrate::fused`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use detoxfuse::calibrate::fused::{self, FusedConfig};
use detoxfuse::calibrate::model::LayerTraining;
use detoxfuse::calibrate::optim::AdamWConfig;
use detoxfuse::hub::Hub;
use detoxfuse::recipes::{self, FusedJob, Recipe};

use crate::calibrate::{with_printer, CalibrateArgs, DataArg};

#[derive(clap::Args)]
pub struct FusedArgs {
    /// fused: the target whose frozen head the map is trained through.
    #[arg(long, default_value = "smollm2")]
    pub target: String,
    /// fused: how the calibration layers train (lora: rank --lora-rank adapters; full: every
    /// layer weight; frozen: only A and the LayerNorm affine).
    #[arg(long, value_enum, default_value = "lora")]
    pub layer_training: LayerTrainingArg,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// fused: rows per step of the target's clean continuations (KL term).
    #[arg(long, default_value_t = FusedConfig::default().keep_rows)]
    pub keep_rows: usize,
    /// fused: rows per step holding toxic tokens (unlikelihood term).
    #[arg(long, default_value_t = FusedConfig::default().detox_rows)]
    pub detox_rows: usize,
    /// fused: α of each training row is drawn from [--alpha-min, --alpha-max].
    #[arg(long, default_value_t = FusedConfig::default().alpha_min)]
    pub alpha_min: f64,
    #[arg(long, default_value_t = FusedConfig::default().alpha_max)]
    pub alpha_max: f64,
    #[arg(long, default_value_t = FusedConfig::default().keep_weight)]
    pub keep_weight: f64,
    /// fused: the keep term's divergence.
    #[arg(long, value_enum, default_value = "reverse")]
    pub keep_divergence: fused::Divergence,
    /// fused: how the fused state is scaled before the target's head, in training and at
    /// inference (recorded in each target's manifest).
    #[arg(long, value_enum, default_value = "keep-target-norm")]
    pub fusion_norm: detoxfuse::fuse::FusionNorm,
    /// fused: weight of the unlikelihood term (0: keep only).
    #[arg(long, default_value_t = FusedConfig::default().detox_weight)]
    pub detox_weight: f64,
    /// fused: the self-generated data (default: <cache>/corpus/selfgen-<target>/samples.jsonl,
    /// written by `detoxfuse corpus selfgen` when missing).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArg,
    /// fused: train only --target's map (A, LayerNorm affine) through its head, over the
    /// calibration layers of this artifact directory (kept frozen), and add the map there:
    /// one calibration model, a map per target. "fused" = the default artifact.
    #[arg(long)]
    pub shared: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LayerTrainingArg {
    Lora,
    Full,
    Frozen,
}

pub(crate) fn config(a: &CalibrateArgs) -> FusedConfig {
    let d = FusedConfig::default();
    let f = &a.fused;
    FusedConfig {
        layers: a.layers,
        layer_training: match f.layer_training {
            LayerTrainingArg::Lora => LayerTraining::Lora { rank: f.lora_rank },
            LayerTrainingArg::Full => LayerTraining::Full,
            LayerTrainingArg::Frozen => LayerTraining::Frozen,
        },
        optim: AdamWConfig {
            lr: a.lr.unwrap_or(d.optim.lr),
            warmup: a.warmup.unwrap_or(d.optim.warmup),
            weight_decay: a.weight_decay.unwrap_or(d.optim.weight_decay),
            clip: a.clip,
            ..d.optim
        },
        steps: a.steps.unwrap_or(d.steps),
        keep_rows: f.keep_rows,
        detox_rows: f.detox_rows,
        alpha_min: f.alpha_min,
        alpha_max: f.alpha_max,
        keep_weight: f.keep_weight,
        keep_divergence: f.keep_divergence,
        detox_weight: f.detox_weight,
        fusion_norm: f.fusion_norm,
        eval_every: a.eval_every.unwrap_or(d.eval_every),
        checkpoint_every: a.checkpoint_every,
        seed: a.seed,
        ..d
    }
}

pub fn calibrate_fused(cache: &Path, a: &CalibrateArgs) -> Result<()> {
    let hub = Hub::new(cache);
    let cfg = config(a);
    let (target, base) = (
        crate::resolve(cache, &a.fused.target)?,
        crate::resolve(cache, &a.base)?,
    );
    let shared = a.fused.shared.as_ref().map(|s| match s.as_str() {
        "fused" => Recipe::Fused.result_dir(&hub),
        dir => PathBuf::from(dir),
    });
    let out = a.out.as_deref();
    let run_dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| recipes::fused_run_dir(&hub, &target, shared.is_some()));
    let resume = a.resumes(&run_dir);
    let job = FusedJob {
        base: &base.to_string_lossy(),
        target: &target.to_string_lossy(),
        samples: a.fused.samples.as_deref(),
        shared: shared.as_deref(),
        out: Some(&run_dir),
        data: Some(&a.fused.data.dir(cache)?),
        cfg: &cfg,
        resume,
    };
    let summary = with_printer(cfg.steps, a.quiet, "calibrate (fused)", |p| {
        recipes::train_fused(&hub, &job, p)
    })?;
    println!(
        "{} steps in {:.0} s; validation {}; artifact: {}",
        summary.steps,
        summary.seconds,
        summary.final_validation,
        summary.artifact.display()
    );
    Ok(())
}
