//! What `--calibration` names, loaded and checked against a target, ready to fuse: the
//! shipped fused default, a fused recipe's artifact, or a paper-recipe calibration model
//! with its alignment (learned here on first use). Also the alignment pipeline itself
//! (`detoxfuse align`).

use std::path::{Path, PathBuf};

use crate::align::{self, AlignConfig, AlignManifest, Alignment, ModelId, Variant};
use crate::calibrate::data::{self, Record};
use crate::calibrate::fused;
use crate::error::{Error, Result};
use crate::fuse::{FusedDecoder, FusionMap, FusionNorm};
use crate::hub::Hub;
use crate::lm::{self, CausalLm};
use crate::recipes::{Observer, Recipe};
use crate::text::vocab::CommonVocab;
use crate::text::Tokenizer;

/// A calibration as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalibrationSpec {
    /// "default": the shipped fused calibration (installed, never trained).
    Shipped,
    /// "fused": the fused recipe trained in this cache (trained on first use).
    Fused,
    /// "paper": the paper recipe's model (trained on first use), with an alignment.
    Paper,
    /// A fused artifact directory or a paper-recipe model directory.
    Dir(PathBuf),
}

impl CalibrationSpec {
    pub fn parse(s: &str) -> Self {
        match s {
            "default" => Self::Shipped,
            "fused" => Self::Fused,
            "paper" => Self::Paper,
            dir => Self::Dir(PathBuf::from(dir)),
        }
    }
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
    /// The fused decoder for `target` at `alpha` (the cross-tokenizer path when the
    /// tokenizers differ), scaling the fused state by the map's own rule.
    pub fn decoder<'a>(
        &'a self,
        target: &'a dyn CausalLm,
        target_tok: &'a Tokenizer,
        alpha: f64,
    ) -> Result<FusedDecoder<'a>> {
        self.decoder_with(target, target_tok, alpha, FusionNorm::Paper)
    }

    /// [`Fusion::decoder`] with a choice of how the fused state is scaled
    /// ([`FusedDecoder::with_norm`]).
    pub fn decoder_with<'a>(
        &'a self,
        target: &'a dyn CausalLm,
        target_tok: &'a Tokenizer,
        alpha: f64,
        norm: FusionNorm,
    ) -> Result<FusedDecoder<'a>> {
        let cross = (!crate::fuse::same_tokenizer(target_tok, &self.tokenizer))
            .then_some((target_tok, &self.tokenizer));
        Ok(
            FusedDecoder::with_map(target, self.model.as_ref(), self.map.clone(), alpha, cross)?
                .with_norm(norm),
        )
    }
}

/// The fused artifact directory `spec` names, or `None` when it names a paper-recipe model.
pub fn fused_artifact_dir(
    hub: &Hub,
    spec: &CalibrationSpec,
    obs: &mut dyn Observer,
) -> Result<Option<PathBuf>> {
    Ok(match spec {
        CalibrationSpec::Shipped => Some(hub.fused_default()?),
        CalibrationSpec::Fused => Some(hub.calibration(Recipe::Fused, obs)?),
        CalibrationSpec::Paper => None,
        CalibrationSpec::Dir(p) => p
            .join(fused::CALIBRATION_MANIFEST)
            .exists()
            .then(|| p.clone()),
    })
}

/// The paper-recipe model directory `spec` names ("paper": trained on first use).
pub fn paper_model_dir(
    hub: &Hub,
    spec: &CalibrationSpec,
    obs: &mut dyn Observer,
) -> Result<PathBuf> {
    match spec {
        CalibrationSpec::Dir(p) => Ok(p.clone()),
        CalibrationSpec::Paper => hub.calibration(Recipe::Paper, obs),
        other => Err(Error::Input(format!(
            "{other:?} is a fused calibration, not a language-model calibration directory"
        ))),
    }
}

/// Where `align` writes by default: `<calibration>/../align/<target>.<variant>.safetensors`.
pub fn default_alignment(cal_dir: &Path, target: &Path, variant: Variant) -> PathBuf {
    let v = match variant {
        Variant::Embedding => "embedding",
        Variant::Hidden => "hidden",
    };
    let base = cal_dir.parent().unwrap_or(cal_dir);
    base.join("align")
        .join(format!("{}.{v}.safetensors", fused::target_key(target)))
}

/// Loads (making on first use, for the defaults) what fused decoding with `spec` needs, and
/// checks it against the target.
#[allow(clippy::too_many_arguments)]
pub fn load_fusion(
    hub: &Hub,
    spec: &CalibrationSpec,
    alignment: Option<&Path>,
    target_path: &Path,
    target: &dyn CausalLm,
    alpha: f64,
    variant: Variant,
    obs: &mut dyn Observer,
) -> Result<Fusion> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Input(format!(
            "--alpha {alpha} is outside [0, 1]; 0 is the untouched target (the default is 0.2)"
        )));
    }
    if let Some(dir) = fused_artifact_dir(hub, spec, obs)? {
        if alignment.is_some() {
            return Err(Error::Input(format!(
                "--alignment applies to paper-recipe calibration models; {} carries its own map per target",
                dir.display()
            )));
        }
        let base = hub.model(crate::recipes::BASE_MODEL, obs)?;
        let art = fused::load_artifact(&dir, &base, target_path)?;
        let (dc, dt) = art.map.dims()?;
        if dt != target.info().hidden_size {
            return Err(Error::Input(format!(
                "the fusion map in {} maps {dc} -> {dt} but the target is {} wide; train one for this target with `detoxfuse calibrate --recipe fused --target ...`",
                dir.display(),
                target.info().hidden_size
            )));
        }
        let model = lm::llama::Llama::from_hf_weights(
            art.calibration.config.clone(),
            art.calibration.tensors,
            "fused-calibration",
            &dir,
            lm::LoadOptions::default(),
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
    let cal_dir = paper_model_dir(hub, spec, obs)?;
    let model = lm::load(&cal_dir)?;
    let tokenizer = Tokenizer::for_model(&cal_dir)?;
    let path = match alignment {
        Some(p) => p.to_path_buf(),
        None => {
            let p = default_alignment(&cal_dir, target_path, variant);
            if !p.exists() {
                obs.note(&format!("no alignment at {}: learning it now", p.display()));
                let cfg = AlignConfig {
                    variant,
                    ..AlignConfig::default()
                };
                learn_alignment(&cal_dir, target_path, &cfg, 600, &hub.corpus(), &p, obs)?;
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

/// Learns the paper's alignment `A` from `cal_dir` into `target_path` and saves it with its
/// manifest at `out` (`texts` corpus passages read by both models for the hidden variant).
/// Progress: a stage per phase, then `bytes(done, total)` over texts or steps.
pub fn learn_alignment(
    cal_dir: &Path,
    target_path: &Path,
    cfg: &AlignConfig,
    texts: usize,
    corpus: &Path,
    out: &Path,
    obs: &mut dyn Observer,
) -> Result<AlignManifest> {
    if cfg.negatives == 0 || cfg.batch == 0 || cfg.epochs == 0 {
        return Err(Error::Input(
            "--negatives, --batch and --epochs must be positive".into(),
        ));
    }
    let cal_tok = Tokenizer::for_model(cal_dir)?;
    let tgt_tok = Tokenizer::for_model(target_path)?;
    let common = CommonVocab::new(&cal_tok, &tgt_tok);
    obs.note(&format!(
        "common vocabulary: {} tokens (calibration {} / target {})",
        common.len(),
        cal_tok.vocab_size(),
        tgt_tok.vocab_size()
    ));
    let pairs = match cfg.variant {
        Variant::Embedding => align::embedding_pairs(
            &align::embedding_table(cal_dir)?,
            &align::embedding_table(target_path)?,
            &common,
            cfg.held_out_per_mille,
        )?,
        Variant::Hidden => {
            let cal = lm::load(cal_dir)?;
            let tgt = lm::load(target_path)?;
            let texts = shared_texts(corpus, texts, cfg.seed)?;
            obs.stage("reading texts");
            let n = texts.len() as u64;
            align::hidden_pairs(
                (cal.as_ref(), &cal_tok),
                (tgt.as_ref(), &tgt_tok),
                &texts,
                cfg.held_out_per_mille,
                &mut |k, _| obs.bytes(k as u64, n),
            )?
        }
    };
    obs.stage("align");
    let (a, loss, acc0, acc, n_train, n_held) = align::train(&pairs, cfg, &mut |s, total, _| {
        obs.bytes(s as u64, total as u64)
    })?;
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
    Ok(manifest)
}
