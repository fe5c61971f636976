//! `detoxfuse align`, and finding (or making on first use) the calibration model and the
//! alignment that `generate --calibration` needs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use detoxfuse::align::{self, AlignConfig, AlignManifest, Alignment, ModelId, Variant};
use detoxfuse::calibrate::data::{self, Record};
use detoxfuse::calibrate::fused;
use detoxfuse::fuse::FusionMap;
use detoxfuse::lm::{self, CausalLm};
use detoxfuse::text::vocab::CommonVocab;
use detoxfuse::text::Tokenizer;
use indicatif::ProgressBar;

use crate::ModelArg;
use detoxfuse::hub::Hub;
use detoxfuse::recipes::Recipe;

#[derive(clap::Args)]
pub struct AlignArgs {
    /// Paper-recipe calibration model directory ("paper": the paper recipe's default model,
    /// trained on first use). The fused recipe learns its own map: `calibrate --recipe fused`.
    #[arg(long, default_value = "paper")]
    calibration: String,
    /// Target model: a .gguf file, a Hugging Face directory or a fetched name.
    #[arg(long, short, default_value = "smollm2")]
    target: String,
    /// embedding: the paper's (input-embedding rows of common tokens); hidden: final hidden
    /// states on shared text (where fusion happens).
    #[arg(long, value_enum, default_value_t = VariantArg::Embedding)]
    variant: VariantArg,
    /// Output file (A as safetensors; the manifest goes beside it as .json).
    /// Default: <calibration>/../align/<target>.<variant>.safetensors.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = AlignConfig::default().negatives)]
    negatives: usize,
    #[arg(long, default_value_t = AlignConfig::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = AlignConfig::default().batch)]
    batch: usize,
    #[arg(long, default_value_t = AlignConfig::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// hidden variant: corpus passages read by both models (default corpus unless --corpus).
    #[arg(long, default_value_t = 600)]
    texts: usize,
    #[arg(long)]
    corpus: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum VariantArg {
    Embedding,
    Hidden,
}

impl From<VariantArg> for Variant {
    fn from(v: VariantArg) -> Self {
        match v {
            VariantArg::Embedding => Variant::Embedding,
            VariantArg::Hidden => Variant::Hidden,
        }
    }
}

/// The paper-recipe calibration model directory for `arg` ("paper": the default one, trained
/// now if missing).
pub fn calibration_dir(cache: &Path, arg: &str) -> Result<PathBuf> {
    if arg != "paper" {
        return Ok(PathBuf::from(arg));
    }
    crate::calibrate::recipe_dir(cache, Recipe::Paper)
}

/// Where `align` writes by default.
pub fn default_alignment(cal_dir: &Path, target: &Path, variant: Variant) -> PathBuf {
    let stem = target
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "target".into());
    let v = match variant {
        Variant::Embedding => "embedding",
        Variant::Hidden => "hidden",
    };
    let base = cal_dir.parent().unwrap_or(cal_dir);
    base.join("align").join(format!("{stem}.{v}.safetensors"))
}

fn bar(len: u64, what: &str) -> ProgressBar {
    crate::progress_bar(len, what, Some(""))
}

/// Texts for the hidden variant: the corpus's plain passages in a seeded, order-free choice.
fn shared_texts(corpus: &Path, n: usize, seed: u64) -> Result<Vec<String>> {
    let mut texts: Vec<String> = data::read_corpus(corpus)?
        .into_iter()
        .filter_map(|r| match r {
            Record::Text { text, .. } => Some(text),
            Record::Pair { .. } => None,
        })
        .collect();
    texts.sort_by_key(|t| data::stable_hash(format!("{seed}:{t}").as_bytes()));
    texts.truncate(n);
    Ok(texts)
}

pub fn run(cache: &Path, a: AlignArgs) -> Result<()> {
    let cal_dir = calibration_dir(cache, &a.calibration)?;
    let target_path = ModelArg {
        model: a.target.clone(),
    }
    .resolve(cache)?;
    let variant: Variant = a.variant.into();
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| default_alignment(&cal_dir, &target_path, variant));
    let cfg = AlignConfig {
        variant,
        negatives: a.negatives,
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        ..AlignConfig::default()
    };
    let corpus = a.corpus.clone().unwrap_or_else(|| Hub::new(cache).corpus());
    align(&cal_dir, &target_path, &cfg, a.texts, &corpus, &out)?;
    Ok(())
}

/// Learns and saves an alignment; prints its quality.
pub fn align(
    cal_dir: &Path,
    target_path: &Path,
    cfg: &AlignConfig,
    texts: usize,
    corpus: &Path,
    out: &Path,
) -> Result<AlignManifest> {
    if cfg.negatives == 0 || cfg.batch == 0 || cfg.epochs == 0 {
        bail!("--negatives, --batch and --epochs must be positive");
    }
    let cal_tok = Tokenizer::for_model(cal_dir)?;
    let tgt_tok = Tokenizer::for_model(target_path)?;
    let common = CommonVocab::new(&cal_tok, &tgt_tok);
    println!(
        "common vocabulary: {} tokens (calibration {} / target {})",
        common.len(),
        cal_tok.vocab_size(),
        tgt_tok.vocab_size()
    );
    let pairs = match cfg.variant {
        Variant::Embedding => align::embedding_pairs(
            &align::embedding_table(cal_dir)?,
            &align::embedding_table(target_path)?,
            &common,
            cfg.held_out_per_mille,
        )?,
        Variant::Hidden => {
            let cal: Box<dyn CausalLm> = lm::load(cal_dir)?;
            let tgt: Box<dyn CausalLm> = lm::load(target_path)?;
            let texts = shared_texts(corpus, texts, cfg.seed)?;
            let pb = bar(texts.len() as u64, "reading texts");
            let p = align::hidden_pairs(
                (cal.as_ref(), &cal_tok),
                (tgt.as_ref(), &tgt_tok),
                &texts,
                cfg.held_out_per_mille,
                &mut |k, _| pb.set_position(k as u64),
            )?;
            pb.finish_and_clear();
            p
        }
    };
    let pb = bar(0, "align");
    let (a, loss, acc0, acc, n_train, n_held) = align::train(&pairs, cfg, &mut |s, total, l| {
        pb.set_length(total as u64);
        pb.set_position(s as u64);
        if s % 50 == 0 {
            pb.set_message(format!("loss {l:.4}"));
        }
    })?;
    pb.finish_and_clear();
    let (wc, wt) = a.dims2()?;
    let manifest = AlignManifest {
        calibration: ModelId::of(cal_dir, wc)?,
        target: ModelId::of(target_path, wt)?,
        config: cfg.clone(),
        common_vocab: common.len(),
        train_pairs: n_train,
        held_out_pairs: n_held,
        final_loss: loss,
        retrieval_at_1: acc,
        retrieval_at_1_init: acc0,
    };
    Alignment {
        a,
        manifest: manifest.clone(),
    }
    .save(out)?;
    println!(
        "{:?} alignment {wc} -> {wt}: {n_train} training / {n_held} held-out pairs, K = {}, {} epochs; final loss {loss:.4}; held-out retrieval accuracy@1 {:.4} (random init {:.4}) -> {}",
        cfg.variant,
        cfg.negatives,
        cfg.epochs,
        acc,
        acc0,
        out.display()
    );
    Ok(manifest)
}

/// A calibration model and the map into a target, ready to fuse.
pub struct Fusion {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    /// `A` and the LayerNorm's parameters (none for the paper's recipe).
    pub map: FusionMap,
    pub calibration: PathBuf,
    /// The alignment file (paper recipe) or the target's map file (fused recipe).
    pub alignment: PathBuf,
}

impl Fusion {
    /// The fused decoder for `target` at `alpha` (the cross-tokenizer path when the tokenizers
    /// differ).
    pub fn decoder<'a>(
        &'a self,
        target: &'a dyn CausalLm,
        target_tok: &'a Tokenizer,
        alpha: f64,
    ) -> Result<detoxfuse::fuse::FusedDecoder<'a>> {
        self.decoder_with(
            target,
            target_tok,
            alpha,
            detoxfuse::fuse::FusionNorm::Paper,
        )
    }

    /// [`Fusion::decoder`] with a choice of how the fused state is scaled.
    pub fn decoder_with<'a>(
        &'a self,
        target: &'a dyn CausalLm,
        target_tok: &'a Tokenizer,
        alpha: f64,
        norm: detoxfuse::fuse::FusionNorm,
    ) -> Result<detoxfuse::fuse::FusedDecoder<'a>> {
        let cross = (!detoxfuse::fuse::same_tokenizer(target_tok, &self.tokenizer))
            .then_some((target_tok, &self.tokenizer));
        Ok(detoxfuse::fuse::FusedDecoder::with_map(
            target,
            self.model.as_ref(),
            self.map.clone(),
            alpha,
            cross,
        )?
        .with_norm(norm))
    }
}

/// The fused recipe's artifact directory for `arg`, or `None` when `arg` names a
/// paper-recipe calibration model: "default" is the shipped default (installed into the
/// cache, no training), "fused" the one `calibrate --recipe fused` trains here (trained now
/// if missing).
pub fn fused_artifact_dir(cache: &Path, arg: &str) -> Result<Option<PathBuf>> {
    if arg == "default" {
        return Ok(Some(detoxfuse::hub::Hub::new(cache).fused_default()?));
    }
    if arg == "fused" {
        return Ok(Some(crate::calibrate::recipe_dir(cache, Recipe::Fused)?));
    }
    let p = PathBuf::from(arg);
    Ok(p.join(fused::CALIBRATION_MANIFEST).exists().then_some(p))
}

/// Loads (making on first use, for the defaults) what `generate --calibration` needs, and
/// checks it against the target.
pub fn load_fusion(
    cache: &Path,
    calibration: &str,
    alignment: Option<&Path>,
    target_path: &Path,
    target: &dyn CausalLm,
    alpha: f64,
    variant: Variant,
) -> Result<Fusion> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("--alpha {alpha} is outside [0, 1]; 0 is the untouched target (the default is 0.2)");
    }
    if let Some(dir) = fused_artifact_dir(cache, calibration)? {
        if alignment.is_some() {
            bail!("--alignment applies to paper-recipe calibration models; {} carries its own map per target", dir.display());
        }
        let base = ModelArg {
            model: "smollm2".into(),
        }
        .resolve(cache)?;
        let art = fused::load_artifact(&dir, &base, target_path)?;
        let (dc, dt) = art.map.dims()?;
        if dt != target.info().hidden_size {
            bail!(
                "the fusion map in {} maps {dc} -> {dt} but the target is {} wide; train one for this target with `detoxfuse calibrate --recipe fused --target ...`",
                dir.display(),
                target.info().hidden_size
            );
        }
        let model = detoxfuse::lm::llama::Llama::from_hf_weights(
            art.calibration.config.clone(),
            art.calibration.tensors,
            "fused-calibration",
            &dir,
            detoxfuse::lm::LoadOptions::default(),
        )?;
        return Ok(Fusion {
            model: Box::new(model),
            tokenizer: art.calibration.tokenizer,
            map: art.map,
            calibration: dir.clone(),
            alignment: dir
                .join("targets")
                .join(format!("{}.safetensors", fused::target_key(target_path))),
        });
    }
    let cal_dir = calibration_dir(cache, calibration)?;
    let model = lm::load(&cal_dir)
        .with_context(|| format!("loading the calibration model {}", cal_dir.display()))?;
    let tokenizer = Tokenizer::for_model(&cal_dir)?;
    let path = match alignment {
        Some(p) => p.to_path_buf(),
        None => {
            let p = default_alignment(&cal_dir, target_path, variant);
            if !p.exists() {
                eprintln!("no alignment at {}: learning it now", p.display());
                let cfg = AlignConfig {
                    variant,
                    ..AlignConfig::default()
                };
                align(
                    &cal_dir,
                    target_path,
                    &cfg,
                    600,
                    &Hub::new(cache).corpus(),
                    &p,
                )?;
            }
            p
        }
    };
    let cal_id = ModelId::of(&cal_dir, model.info().hidden_size)?;
    let tgt_id = ModelId::of(target_path, target.info().hidden_size)?;
    let al = Alignment::load(&path, &cal_id, &tgt_id)?;
    Ok(Fusion {
        model,
        tokenizer,
        map: FusionMap::paper(&al.a)?,
        calibration: cal_dir,
        alignment: path,
    })
}
