//! `detoxfuse align`, and finding (or making on first use) the calibration model and the
//! alignment that `generate --calibration` needs.

use std::path::{Path, PathBuf};

use anyhow::Result;
use detoxfuse::align::{AlignConfig, Variant};
use detoxfuse::calibration::{self, CalibrationSpec, Fusion};
use detoxfuse::hub::Hub;
use detoxfuse::lm::CausalLm;

use crate::calibrate::with_printer;

#[derive(clap::Args)]
pub struct AlignArgs {
    /// Paper-recipe calibration model directory ("paper": the paper recipe's default model,
    /// trained on first use). The fused recipe learns its own map: `calibrate --recipe fused`.
    #[arg(long, default_value = "paper")]
    calibration: String,
    /// Target model: a .gguf file, a Hugging Face directory or a fetched name.
    #[arg(long, short, default_value = "smollm2")]
    target: String,
    /// Output file (A as safetensors; the manifest goes beside it as .json).
    /// Default: <calibration>/../align/<target>.<variant>.safetensors.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    cfg: AlignConfig,
    /// hidden variant: corpus passages read by both models (default corpus unless --corpus).
    #[arg(long, default_value_t = 600)]
    texts: usize,
    #[arg(long)]
    corpus: Option<PathBuf>,
}

/// The paper-recipe calibration model directory for `arg` ("paper": the default one, trained
/// now if missing).
pub fn calibration_dir(cache: &Path, arg: &str) -> Result<PathBuf> {
    with_printer(0, false, "calibrate", |p| {
        calibration::paper_model_dir(&Hub::new(cache), &CalibrationSpec::parse(arg), p)
    })
}

pub fn run(cache: &Path, a: AlignArgs) -> Result<()> {
    let cal_dir = calibration_dir(cache, &a.calibration)?;
    let target_path = crate::resolve(cache, &a.target)?;
    let cfg = a.cfg.clone();
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| calibration::default_alignment(&cal_dir, &target_path, cfg.variant));
    let corpus = a.corpus.clone().unwrap_or_else(|| Hub::new(cache).corpus());
    let m = with_printer(0, false, "align", |p| {
        calibration::learn_alignment(&cal_dir, &target_path, &cfg, a.texts, &corpus, &out, p)
    })?;
    println!("{m} -> {}", out.display());
    Ok(())
}

/// [`calibration::load_fusion`] for a `--calibration` argument, with progress on the terminal.
pub fn load_fusion(
    cache: &Path,
    calibration: &str,
    alignment: Option<&Path>,
    target_path: &Path,
    target: &dyn CausalLm,
    alpha: f64,
    variant: Variant,
) -> Result<Fusion> {
    with_printer(0, false, "calibrate", |p| {
        calibration::load_fusion(
            &Hub::new(cache),
            &CalibrationSpec::parse(calibration),
            alignment,
            target_path,
            target,
            alpha,
            variant,
            p,
        )
    })
}
