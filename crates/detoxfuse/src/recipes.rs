//! The named calibration recipes as values, and the one way to get their results: ask the
//! [`Hub`] for a [`Recipe`] and it returns the trained model's directory, training it in
//! this process first when the cache lacks it (resuming a run that was cut off), and
//! building whatever data it needs the same way.
//!
//! - [`Recipe::Paper`]: the paper's calibration model, a language model on the clean corpus
//!   (tuned-lens head, an unlikelihood term on ToxiGen hate lists); the DExperts expert and
//!   the model that `align` maps into a target.
//! - [`Recipe::AntiExpert`]: the DExperts anti-expert, the paper recipe's trainer settings
//!   (tuned-lens head, [`PAPER_STEPS`]) on the toxic corpus, without the unlikelihood term
//!   (one on toxic text would defeat it). Expert and anti-expert share one recipe, so their
//!   difference carries the data's difference, not a difference of heads or budgets.
//! - [`Recipe::Fused`]: the fusion-aware recipe (adapters and the map into SmolLM2 trained
//!   through its frozen head); the shipped default is this recipe's result
//!   ([`Hub::fused_default`]).
//!
//! The CLI's `calibrate` defaults are these values (a CLI test checks it), so a default run
//! started by hand and one started here share their directory and resume each other.

use std::path::{Path, PathBuf};

use crate::calibrate::corpus::CorpusOptions;
use crate::calibrate::fused::{self, FusedConfig, FusedEvent, FusedInputs, FusedSummary};
use crate::calibrate::guard::LeakageGuard;
use crate::calibrate::optim::AdamWConfig;
use crate::calibrate::prepare;
use crate::calibrate::selfgen::SelfGenConfig;
use crate::calibrate::train::{self, Base, Event, HeadInit, TrainConfig, TrainSummary};
use crate::error::{Error, Result};
use crate::fetch::{Progress, Silent};
use crate::hub::Hub;
use crate::score::ProfanityCheck;

/// The paper recipe's step count: corpus build + lens fit + training of the default model
/// stay under an hour on 2 cores.
pub const PAPER_STEPS: usize = 300;
/// The paper recipe's unlikelihood weight (docs/CALIBRATION.md has the choice).
pub const PAPER_UNLIKELIHOOD: f64 = 10.0;
/// The base model every recipe starts from, and the fused recipe's target.
pub const BASE_MODEL: &str = "smollm2";

/// A named calibration recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    Paper,
    AntiExpert,
    Fused,
}

impl Recipe {
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Paper => "the paper recipe's calibration model",
            Recipe::AntiExpert => "the DExperts anti-expert",
            Recipe::Fused => "the fused calibration",
        }
    }

    /// The run directory (log, checkpoints, result) in `<cache>/calibration`. The names
    /// carry the recipe, so a run of an earlier default is never resumed with other options.
    pub fn run_dir(self, hub: &Hub) -> PathBuf {
        hub.cache().join("calibration").join(match self {
            Recipe::Paper => "smollm2-L3-lens-ul",
            // Until 2026-12-05 the anti-expert had the tied head and 360 steps in
            // `smollm2-L3-antiexpert`; the new name keeps such a run from being resumed.
            Recipe::AntiExpert => "smollm2-L3-lens-antiexpert",
            Recipe::Fused => "fused-smollm2-L3",
        })
    }

    /// The result inside [`Recipe::run_dir`]: `model/` (a language-model directory) or
    /// `artifact/` (the fused recipe's calibration and maps).
    pub fn result_dir(self, hub: &Hub) -> PathBuf {
        self.run_dir(hub).join(match self {
            Recipe::Fused => "artifact",
            _ => "model",
        })
    }

    /// Whether the result is complete in the cache.
    pub fn is_trained(self, hub: &Hub) -> bool {
        let dir = self.result_dir(hub);
        match self {
            Recipe::Fused => dir.join(fused::CALIBRATION_MANIFEST).exists(),
            _ => dir.join("config.json").exists(),
        }
    }

    /// A rough training time on 2 cores, for the message before training on first use.
    pub fn minutes(self) -> u32 {
        match self {
            Recipe::Paper => 50,
            Recipe::AntiExpert => 35,
            Recipe::Fused => 30,
        }
    }
}

/// The paper recipe's trainer options (`hub` places its unlikelihood corpus).
pub fn paper_config(hub: &Hub) -> TrainConfig {
    TrainConfig {
        head_init: HeadInit::Lens,
        lens_texts: 200,
        lens_ridge: 1e-3,
        unlikelihood: PAPER_UNLIKELIHOOD,
        unlikely_corpus: Some(hub.unlikely_corpus()),
        optim: AdamWConfig {
            total_steps: PAPER_STEPS,
            ..AdamWConfig::default()
        },
        steps: PAPER_STEPS,
        ..TrainConfig::default()
    }
}

/// The anti-expert's trainer options: the paper recipe's, without the unlikelihood term.
pub fn anti_expert_config() -> TrainConfig {
    TrainConfig {
        head_init: HeadInit::Lens,
        lens_texts: 200,
        lens_ridge: 1e-3,
        unlikelihood: 0.0,
        unlikely_corpus: None,
        optim: AdamWConfig {
            total_steps: PAPER_STEPS,
            ..AdamWConfig::default()
        },
        steps: PAPER_STEPS,
        ..TrainConfig::default()
    }
}

/// What a recipe's training reports: the data builders' progress ([`Progress`]), notes
/// (what is being made and why), and the trainers' events. Every method defaults to
/// nothing.
pub trait Observer: Progress {
    fn note(&mut self, _msg: &str) {}
    fn train_event(&mut self, _e: Event) {}
    fn fused_event(&mut self, _e: FusedEvent) {}
}

impl Observer for Silent {}

/// A language-model recipe's job: train `cfg` on `corpus` into `out`.
pub struct PaperJob<'a> {
    /// The base model (name or path) whose first layers start the model.
    pub base: &'a str,
    /// The corpus; `None`: the default clean corpus, built with default options if missing.
    pub corpus: Option<&'a Path>,
    pub out: &'a Path,
    pub cfg: &'a TrainConfig,
    pub resume: bool,
}

/// Trains a language-model calibration recipe (the paper's, or the anti-expert's with
/// `corpus` set to the toxic corpus): the unlikelihood pairs and the default corpus are
/// built first when `cfg` needs them and they are missing.
pub fn train_paper(hub: &Hub, job: &PaperJob, obs: &mut dyn Observer) -> Result<TrainSummary> {
    if let Some(u) = &job.cfg.unlikely_corpus {
        // Only the default file is made here; a file the caller named must exist.
        if !u.exists() && *u == hub.unlikely_corpus() {
            obs.note(&format!(
                "no unlikelihood corpus at {}: writing it",
                u.display()
            ));
            prepare::build_unlikely_corpus(u, &hub.data_dir()?, "hate")?;
        }
    }
    let corpus = match job.corpus {
        Some(c) => c.to_path_buf(),
        None => {
            let c = hub.corpus();
            if !c.exists() || !c.with_extension("manifest.json").exists() {
                obs.note(&format!(
                    "no corpus at {}: building it with the default options (`detoxfuse corpus build`)",
                    c.display()
                ));
                prepare::build_corpus(
                    hub,
                    &c,
                    &CorpusOptions::default(),
                    BASE_MODEL,
                    &hub.data_dir()?,
                    obs,
                )?;
            }
            c
        }
    };
    if !corpus.exists() {
        return Err(Error::Input(format!(
            "corpus {} does not exist; build it with `detoxfuse corpus build` or pass --corpus",
            corpus.display()
        )));
    }
    let base_path = hub.model(job.base, obs)?;
    let base = Base::load(&base_path, job.cfg.layers)?;
    train::train(&base, &corpus, job.out, job.cfg, job.resume, &mut |e| {
        obs.train_event(e)
    })
}

/// The fused recipe's job.
pub struct FusedJob<'a> {
    pub base: &'a str,
    /// The target whose frozen head the map trains through (name or path).
    pub target: &'a str,
    /// The self-generated data; `None`: `<cache>/corpus/selfgen-<target>`, sampled if missing.
    pub samples: Option<&'a Path>,
    /// Train only the target's map over this artifact's calibration layers (kept frozen).
    pub shared: Option<&'a Path>,
    /// The run directory; `None`: [`Recipe::Fused`]'s, or `map-<target>` in it with `shared`.
    pub out: Option<&'a Path>,
    /// The data directory; `None`: [`Hub::data_dir`].
    pub data: Option<&'a Path>,
    pub cfg: &'a FusedConfig,
    pub resume: bool,
}

/// Where the fused recipe trains by default: [`Recipe::Fused`]'s run directory, or
/// `map-<target>` inside it for a map trained over shared layers.
pub fn fused_run_dir(hub: &Hub, target: &Path, shared: bool) -> PathBuf {
    let dir = Recipe::Fused.run_dir(hub);
    if shared {
        dir.join(format!("map-{}", fused::target_key(target)))
    } else {
        dir
    }
}

/// Trains the fused recipe (or one more target's map with `shared`), sampling its
/// self-generated data first when missing.
pub fn train_fused(hub: &Hub, job: &FusedJob, obs: &mut dyn Observer) -> Result<FusedSummary> {
    let data = match job.data {
        Some(d) => d.to_path_buf(),
        None => hub.data_dir()?,
    };
    let target_path = hub.model(job.target, obs)?;
    let base_path = hub.model(job.base, obs)?;
    let samples = match job.samples {
        Some(s) => s.to_path_buf(),
        None => {
            let dir = hub.selfgen_dir(&target_path);
            if !dir.join("manifest.json").exists() {
                obs.note(&format!(
                    "no self-generated data in {}: sampling it now (`detoxfuse corpus selfgen`)",
                    dir.display()
                ));
                let cfg = SelfGenConfig {
                    seed: job.cfg.seed,
                    ..SelfGenConfig::default()
                };
                prepare::build_selfgen(&target_path, &dir, &data, &cfg, &mut |d, n| {
                    obs.bytes(d as u64, n as u64)
                })?;
            }
            dir.join("samples.jsonl")
        }
    };
    let out = job
        .out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| fused_run_dir(hub, &target_path, job.shared.is_some()));
    let cfg = job.cfg.clone();
    let guard = LeakageGuard::from_rtp_dir(&data.join("rtp"))?;
    let base = Base::load(&base_path, cfg.layers)?;
    let target = crate::lm::load(&target_path)?;
    let target_tok = crate::text::Tokenizer::for_model(&target_path)?;
    let inputs = FusedInputs {
        base: &base,
        target: target.as_ref(),
        target_path: &target_path,
        target_sha256: crate::fetch::sha256_path(&target_path)?,
        samples: &samples,
        guard: &guard,
        scorer: ProfanityCheck::shared(),
        target_tok: &target_tok,
        shared: job.shared,
        artifact: job
            .shared
            .map(Path::to_path_buf)
            .unwrap_or_else(|| out.join("artifact")),
    };
    fused::train(&inputs, &out, &cfg, job.resume, &mut |e| obs.fused_event(e))
}

impl Hub {
    /// The clean corpus (`corpus build`).
    pub fn corpus(&self) -> PathBuf {
        self.cache().join("corpus").join("corpus.jsonl")
    }

    /// The anti-expert's toxic corpus (`corpus toxic`).
    pub fn toxic_corpus(&self) -> PathBuf {
        self.cache().join("corpus").join("toxic.jsonl")
    }

    /// The paper recipe's unlikelihood pairs (`corpus unlikely`).
    pub fn unlikely_corpus(&self) -> PathBuf {
        self.cache().join("corpus").join("unlikely.jsonl")
    }

    /// The fused recipe's self-generated data for `target` (`corpus selfgen`).
    pub fn selfgen_dir(&self, target: &Path) -> PathBuf {
        self.cache()
            .join("corpus")
            .join(format!("selfgen-{}", fused::target_key(target)))
    }

    /// The result directory of `recipe`, trained in this process first when the cache
    /// lacks it (an interrupted earlier run resumes).
    pub fn calibration(&self, recipe: Recipe, obs: &mut dyn Observer) -> Result<PathBuf> {
        let dir = recipe.result_dir(self);
        if recipe.is_trained(self) {
            return Ok(dir);
        }
        let run = recipe.run_dir(self);
        obs.note(&format!(
            "{} is not in {}: training it now (about {} minutes on 2 cores)",
            recipe.name(),
            dir.display(),
            recipe.minutes()
        ));
        let resume = run.join("checkpoint.json").exists();
        match recipe {
            Recipe::Paper => {
                let cfg = paper_config(self);
                train_paper(
                    self,
                    &PaperJob {
                        base: BASE_MODEL,
                        corpus: None,
                        out: &run,
                        cfg: &cfg,
                        resume,
                    },
                    obs,
                )?;
            }
            Recipe::AntiExpert => {
                let corpus = self.toxic_corpus();
                if !corpus.exists() {
                    obs.note(&format!(
                        "no toxic corpus at {}: writing it (`detoxfuse corpus toxic`)",
                        corpus.display()
                    ));
                    prepare::build_toxic_corpus(
                        self,
                        &corpus,
                        &self.data_dir()?,
                        CorpusOptions::default().threshold,
                        obs,
                    )?;
                }
                train_paper(
                    self,
                    &PaperJob {
                        base: BASE_MODEL,
                        corpus: Some(&corpus),
                        out: &run,
                        cfg: &anti_expert_config(),
                        resume,
                    },
                    obs,
                )?;
            }
            Recipe::Fused => {
                train_fused(
                    self,
                    &FusedJob {
                        base: BASE_MODEL,
                        target: BASE_MODEL,
                        samples: None,
                        shared: None,
                        out: None,
                        data: None,
                        cfg: &FusedConfig::default(),
                        resume,
                    },
                    obs,
                )?;
            }
        }
        if !recipe.is_trained(self) {
            return Err(Error::Input(format!(
                "training {} finished but {} is incomplete; rerun to resume",
                recipe.name(),
                dir.display()
            )));
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what a recipe run reports.
    #[derive(Default)]
    struct Notes(Vec<String>);
    impl Progress for Notes {
        fn stage(&mut self, msg: &str) {
            self.0.push(format!("stage {msg}"));
        }
        fn bytes(&mut self, _: u64, _: u64) {}
    }
    impl Observer for Notes {
        fn note(&mut self, msg: &str) {
            self.0.push(msg.to_string());
        }
    }

    #[test]
    fn every_recipe_has_its_own_run_directory_in_the_cache() {
        let hub = Hub::new("/c");
        let dirs: Vec<PathBuf> = [Recipe::Paper, Recipe::AntiExpert, Recipe::Fused]
            .iter()
            .map(|r| r.result_dir(&hub))
            .collect();
        assert_eq!(
            dirs,
            [
                PathBuf::from("/c/calibration/smollm2-L3-lens-ul/model"),
                PathBuf::from("/c/calibration/smollm2-L3-lens-antiexpert/model"),
                PathBuf::from("/c/calibration/fused-smollm2-L3/artifact"),
            ]
        );
    }

    #[test]
    fn a_trained_recipe_is_returned_without_training_or_fetching() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::new(dir.path());
        for (recipe, marker) in [
            (Recipe::Paper, "config.json"),
            (Recipe::AntiExpert, "config.json"),
            (Recipe::Fused, fused::CALIBRATION_MANIFEST),
        ] {
            let result = recipe.result_dir(&hub);
            std::fs::create_dir_all(&result).unwrap();
            std::fs::write(result.join(marker), "{}").unwrap();
            let mut notes = Notes::default();
            assert_eq!(hub.calibration(recipe, &mut notes).unwrap(), result);
            assert!(notes.0.is_empty(), "{recipe:?}: {:?}", notes.0);
        }
    }

    #[test]
    fn a_missing_corpus_is_named_before_any_work() {
        // Nothing is fetched, loaded or trained: the corpus is checked first.
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::new(dir.path());
        let job = PaperJob {
            base: BASE_MODEL,
            corpus: Some(&dir.path().join("nope.jsonl")),
            out: &dir.path().join("run"),
            cfg: &anti_expert_config(),
            resume: false,
        };
        let mut notes = Notes::default();
        let err = train_paper(&hub, &job, &mut notes).unwrap_err().to_string();
        assert!(
            err.contains("nope.jsonl") && err.contains("corpus build"),
            "{err}"
        );
    }

    /// The shipped default is what [`Recipe::Fused`] trains: its recorded options are the
    /// recipe's defaults (so "reproduce the shipped model" is "run the default recipe").
    #[test]
    fn the_shipped_calibration_was_trained_with_the_default_recipe() {
        let (_, bytes) = crate::hub::SHIPPED
            .iter()
            .find(|(n, _)| *n == fused::CALIBRATION_MANIFEST)
            .unwrap();
        let m: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let cfg: FusedConfig = serde_json::from_value(m["trained_by"]["config"].clone()).unwrap();
        assert_eq!(cfg, FusedConfig::default());
    }

    #[test]
    fn the_recipes_differ_where_they_should() {
        let hub = Hub::new("/c");
        let (paper, anti) = (paper_config(&hub), anti_expert_config());
        assert_eq!(paper.head_init, HeadInit::Lens);
        assert_eq!(paper.unlikely_corpus, Some(hub.unlikely_corpus()));
        assert_eq!(
            (paper.steps, paper.optim.total_steps),
            (PAPER_STEPS, PAPER_STEPS)
        );
        // One recipe: the anti-expert differs from the expert only in the unlikelihood term
        // (and, where it is trained, its corpus).
        assert_eq!(
            (anti.unlikelihood, anti.unlikely_corpus.clone()),
            (0.0, None)
        );
        assert_eq!(
            TrainConfig {
                unlikelihood: paper.unlikelihood,
                unlikely_corpus: paper.unlikely_corpus.clone(),
                ..anti.clone()
            },
            paper
        );
        // Everything else is the trainer's default in both.
        let strip = |c: &TrainConfig| TrainConfig {
            head_init: HeadInit::Tied,
            lens_texts: 0,
            lens_ridge: 0.0,
            unlikelihood: 0.0,
            unlikely_corpus: None,
            steps: 0,
            optim: AdamWConfig {
                total_steps: 0,
                ..c.optim
            },
            ..c.clone()
        };
        assert_eq!(strip(&paper), strip(&anti));
        assert_eq!(strip(&anti), strip(&TrainConfig::default()));
    }
}
