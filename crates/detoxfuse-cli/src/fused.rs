//! `detoxfuse calibrate --recipe fused`: options and printing around
//! [`detoxfuse::calibrate::fused`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use detoxfuse::calibrate::fused::{self, FusedConfig, FusedEvent, FusedInputs};
use detoxfuse::calibrate::guard::LeakageGuard;
use detoxfuse::calibrate::model::LayerTraining;
use detoxfuse::calibrate::optim::AdamWConfig;
use detoxfuse::calibrate::selfgen::SelfGenConfig;
use detoxfuse::calibrate::train::Base;
use detoxfuse::eval::score::ProfanityCheck;

use crate::calibrate::{build_selfgen, data_dir, default_selfgen_dir, CalibrateArgs};
use crate::ModelArg;

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
    /// fused: the keep term's divergence: reverse = KL(p_α‖p_target) (penalises what sampling
    /// from the fused model would put where the target puts little), forward = KL(p_target‖p_α).
    #[arg(long, value_enum, default_value = "reverse")]
    pub keep_divergence: DivergenceArg,
    /// fused: how the fused state is scaled before the target's head, in training and at
    /// inference (recorded in each target's manifest): paper = the paper's formula as is;
    /// keep-target-norm = then rescaled to the target state's RMS, so that α changes the
    /// direction of the state and not the temperature of the distribution.
    #[arg(long, value_enum, default_value = "keep-target-norm")]
    pub fusion_norm: FusionNormArg,
    /// fused: weight of the unlikelihood term (0: keep only).
    #[arg(long, default_value_t = FusedConfig::default().detox_weight)]
    pub detox_weight: f64,
    /// fused: the self-generated data (default: <cache>/corpus/selfgen-<target>/samples.jsonl,
    /// written by `detoxfuse corpus selfgen` when missing).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Directory with hh-rlhf/, toxigen/ and rtp/ (default: $DETOXFUSE_DATA, else the vendored data installed into <cache>/data).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// fused: train only --target's map (A, LayerNorm affine) through its head, over the
    /// calibration layers of this artifact directory (kept frozen), and add the map there:
    /// one calibration model, a map per target. "fused" = the default artifact.
    #[arg(long)]
    pub shared: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DivergenceArg {
    Reverse,
    Forward,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FusionNormArg {
    Paper,
    KeepTargetNorm,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LayerTrainingArg {
    Lora,
    Full,
    Frozen,
}

/// Where the fused recipe trains by default.
pub fn default_fused_dir(cache: &Path) -> PathBuf {
    cache.join("calibration").join("fused-smollm2-L3")
}

fn config(a: &CalibrateArgs) -> FusedConfig {
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
        keep_divergence: match f.keep_divergence {
            DivergenceArg::Reverse => fused::Divergence::Reverse,
            DivergenceArg::Forward => fused::Divergence::Forward,
        },
        detox_weight: f.detox_weight,
        fusion_norm: match f.fusion_norm {
            FusionNormArg::Paper => fused::FusionNorm::Paper,
            FusionNormArg::KeepTargetNorm => fused::FusionNorm::KeepTargetNorm,
        },
        eval_every: a.eval_every.unwrap_or(d.eval_every),
        checkpoint_every: a.checkpoint_every,
        seed: a.seed,
        ..d
    }
}

pub fn calibrate_fused(cache: &Path, a: &CalibrateArgs) -> Result<()> {
    let cfg = config(a);
    let data = data_dir(cache, a.fused.data.clone())?;
    let target_path = ModelArg {
        model: a.fused.target.clone(),
    }
    .resolve(cache)?;
    let base_path = ModelArg {
        model: a.base.clone(),
    }
    .resolve(cache)?;
    let samples = match &a.fused.samples {
        Some(s) => s.clone(),
        None => {
            let dir = default_selfgen_dir(cache, &target_path);
            let s = dir.join("samples.jsonl");
            if !dir.join("manifest.json").exists() {
                eprintln!(
                    "no self-generated data in {}: sampling it now (`detoxfuse corpus selfgen`)",
                    dir.display()
                );
                build_selfgen(
                    &target_path,
                    &dir,
                    &data,
                    &SelfGenConfig {
                        seed: a.seed,
                        ..SelfGenConfig::default()
                    },
                )?;
            }
            s
        }
    };
    let shared = a.fused.shared.as_ref().map(|s| match s.as_str() {
        "fused" => default_fused_dir(cache).join("artifact"),
        dir => PathBuf::from(dir),
    });
    let out = a.out.clone().unwrap_or_else(|| match &shared {
        Some(_) => {
            default_fused_dir(cache).join(format!("map-{}", fused::target_key(&target_path)))
        }
        None => default_fused_dir(cache),
    });
    let mut cfg = cfg;
    if shared.is_some() {
        cfg.layer_training = LayerTraining::Frozen;
    }
    let guard = LeakageGuard::from_rtp_dir(&data.join("rtp"))?;
    let base = Base::load(&base_path, cfg.layers)?;
    let target = detoxfuse::lm::load(&target_path)?;
    let target_tok = detoxfuse::text::Tokenizer::for_model(&target_path)?;
    let inputs = FusedInputs {
        base: &base,
        target: target.as_ref(),
        target_path: &target_path,
        target_sha256: detoxfuse::calibrate::train::sha256_path(&target_path)?,
        samples: &samples,
        guard: &guard,
        scorer: ProfanityCheck::shared(),
        target_tok: &target_tok,
        shared: shared.as_deref(),
        artifact: shared.clone().unwrap_or_else(|| out.join("artifact")),
    };
    let resume = a.resume || (a.resume_if_present && out.join("checkpoint.json").exists());
    let pb = crate::calibrate::step_bar(cfg.steps, a.quiet, "calibrate (fused)");
    let say = |msg: String| {
        if a.quiet {
            println!("{msg}");
        } else {
            pb.println(msg);
        }
    };
    let summary = fused::train(&inputs, &out, &cfg, resume, &mut |e| match e {
        FusedEvent::Start {
            step,
            steps,
            keep_rows,
            detox_rows,
            trainable_params,
            stats,
        } => {
            pb.set_position(step as u64);
            pb.reset_eta();
            say(format!(
                "{} prompts, {} continuations ({} with a toxic token): {} keep positions, {} toxic tokens ({} in prompts); {keep_rows} keep rows and {detox_rows} detox rows for training; {:.2} M trainable parameters; step {step} of {steps}",
                stats.prompts, stats.samples, stats.toxic_samples, stats.keep_positions,
                stats.detox_positions, stats.detox_from_prompts, trainable_params as f64 / 1e6
            ));
        }
        FusedEvent::Step(s) => {
            pb.set_position(s.step as u64);
            pb.set_message(format!(
                "kl {:.4} ul {:.4} p(toxic) {:.4} {:.1} s/step",
                s.kl, s.unlikelihood, s.toxic_prob, s.seconds
            ));
            if a.quiet {
                println!(
                    "step {} kl {:.5} rkl {:.5} ul {:.5} p_toxic {:.5} lr {:.3e} grad_norm {:.3} {:.1} s",
                    s.step, s.kl, s.reverse_kl, s.unlikelihood, s.toxic_prob, s.lr, s.grad_norm, s.seconds
                );
            }
        }
        FusedEvent::Validation(v) => say(format!("validation {v}")),
        FusedEvent::Checkpoint { .. } => {}
    })?;
    pb.finish_and_clear();
    println!(
        "{} steps in {:.0} s; validation {}; artifact: {}",
        summary.steps,
        summary.seconds,
        summary.final_validation,
        summary.artifact.display()
    );
    Ok(())
}
