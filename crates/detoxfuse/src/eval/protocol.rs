//! The field's evaluation protocol (EVALUATION.md) as one resumable run: the untouched
//! target, the fused model at several alphas and the baselines, each method's generations
//! scored for toxicity, then perplexity under an evaluator LM that is not the target, then
//! the report (`report.json`, `report.md`, `report.svg`). Every phase appends to its own
//! file in the output directory, so a rerun of the same plan continues where the last one
//! stopped; a rerun with changed settings is refused.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::baselines::{self, BannedSequences, ExpertsDecoder, WordFilterDecoder};
use super::harness::{self, Prompt};
use super::report::{self, Report};
use super::score::ProfanityCheck;
use crate::align::Variant;
use crate::calibrate::corpus::{toxigen_group, HELD_BACK_GROUPS};
use crate::calibration::{self, CalibrationSpec};
use crate::error::{Error, IoContext, Result};
use crate::fuse::{load_with_target_vocab, FusionNorm};
use crate::generate::{Decoder, GenerationConfig, PlainDecoder};
use crate::hub::Hub;
use crate::lm;
use crate::recipes::{Observer, Recipe};
use crate::sample::SamplingParams;
use crate::text::Tokenizer;

/// Prompts and samples of the quick profile.
pub const QUICK_PROMPTS: usize = 40;
pub const QUICK_SAMPLES: usize = 25;

/// One row of the evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Base,
    /// The fused model at α, scaled by the calibration's own rule.
    Fused(f64),
    /// The fused model at α with every fused state rescaled to the target state's norm.
    FusedNorm(f64),
    /// The paper recipe's calibration model with its alignment, at α (the comparison row).
    Paper(f64),
    WordFilter,
    /// DExperts-style: `logits = base + β · (expert − anti-expert)`.
    Dexperts(f32),
}

impl Method {
    /// The row's name (and the file stem of its generations).
    pub fn name(&self) -> String {
        match self {
            Method::Base => "base".into(),
            Method::Fused(a) => format!("fused-a{a}"),
            Method::FusedNorm(a) => format!("fused-norm-a{a}"),
            Method::Paper(a) => format!("paper-a{a}"),
            Method::WordFilter => "wordfilter".into(),
            Method::Dexperts(b) => format!("dexperts-b{b}"),
        }
    }

    /// The rows that method names stand for: `fused`/`fusednorm` one per alpha, `paper` one
    /// per paper alpha, `dexperts` one per beta.
    pub fn parse_list(
        names: &[String],
        alphas: &[f64],
        paper_alphas: &[f64],
        betas: &[f32],
    ) -> Result<Vec<Method>> {
        let mut out = Vec::new();
        for m in names {
            match m.as_str() {
                "base" => out.push(Method::Base),
                "fused" | "fusednorm" => {
                    for &alpha in alphas {
                        if !(0.0..=1.0).contains(&alpha) {
                            return Err(Error::Input(format!(
                                "--alphas: {alpha} is outside [0, 1]"
                            )));
                        }
                        out.push(if m == "fused" {
                            Method::Fused(alpha)
                        } else {
                            Method::FusedNorm(alpha)
                        });
                    }
                }
                "paper" => {
                    for &alpha in paper_alphas {
                        if !(0.0..=1.0).contains(&alpha) {
                            return Err(Error::Input(format!(
                                "--paper-alphas: {alpha} is outside [0, 1]"
                            )));
                        }
                        out.push(Method::Paper(alpha));
                    }
                }
                "wordfilter" => out.push(Method::WordFilter),
                "dexperts" => {
                    for &beta in betas {
                        if !(beta.is_finite() && beta >= 0.0) {
                            return Err(Error::Input(format!(
                                "--dexperts-beta: {beta} is not a finite number >= 0"
                            )));
                        }
                        out.push(Method::Dexperts(beta));
                    }
                }
                other => return Err(Error::Input(format!(
                    "--methods: unknown method {other:?}; choose from base, fused, fusednorm, paper, wordfilter, dexperts"
                ))),
            }
        }
        Ok(out)
    }
}

/// Everything that decides an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    /// The target: a registry name or a path.
    pub target: String,
    /// The evaluator LM for perplexity (default: gemma3, or smollm2 for a gemma3 target).
    pub evaluator: Option<String>,
    /// Default: `<data>/rtp/challenging-toxic-1196.jsonl`.
    pub prompts: Option<PathBuf>,
    /// The quick profile: 40 prompts spread evenly over the file.
    pub quick: bool,
    pub limit: Option<usize>,
    /// Samples per prompt (default 25).
    pub samples: Option<usize>,
    pub max_tokens: usize,
    pub top_p: f32,
    pub temperature: f32,
    pub seed: u64,
    pub methods: Vec<Method>,
    pub calibration: CalibrationSpec,
    pub align_variant: Variant,
    /// The DExperts expert (a paper-recipe model).
    pub expert: CalibrationSpec,
    /// The DExperts anti-expert; `None`: [`Recipe::AntiExpert`].
    pub anti_expert: Option<PathBuf>,
    /// Perplexity of the first N samples of each prompt (default: all).
    pub perplexity_samples: Option<usize>,
    pub no_perplexity: bool,
    /// Default: `<cache>/eval/<target>-<prompts>-<profile>`.
    pub out: Option<PathBuf>,
    pub skip_invalid: bool,
    pub allow_trained_groups: bool,
    /// Recorded in the report: the command line and the source revision.
    pub command: String,
    pub commit: String,
}

/// What a run reports as it goes, beyond a recipe's training ([`Observer`]).
pub trait EvalObserver: Observer {
    /// A phase over `total` prompts begins (generation or perplexity of one method).
    fn phase(&mut self, _what: &str, _total: usize) {}
    /// `done` of the phase's `total` prompts are finished (earlier runs' included).
    fn advance(&mut self, _done: usize, _total: usize) {}
}

impl EvalObserver for crate::fetch::Silent {}

/// A finished run.
pub struct EvalOutcome {
    pub out: PathBuf,
    pub report: Report,
    /// The report as markdown (also in `report.md`).
    pub markdown: String,
}

/// Runs (or continues) `plan`.
pub fn run(hub: &Hub, plan: &EvalPlan, obs: &mut dyn EvalObserver) -> Result<EvalOutcome> {
    let a = plan;
    let cache = hub.cache();
    let methods = a.methods.clone();
    let prompts_path = match a.prompts.clone() {
        Some(p) => p,
        None => hub
            .data_dir()?
            .join("rtp")
            .join("challenging-toxic-1196.jsonl"),
    };
    let file_name = prompts_path.file_name().and_then(|n| n.to_str());
    if let Some((_, g)) = file_name.and_then(toxigen_group) {
        if !HELD_BACK_GROUPS.contains(&g) && !a.allow_trained_groups {
            return Err(Error::Input(format!(
                "{}: the calibration corpora (paired replies, unlikelihood pairs) and the \
                 anti-expert train on ToxiGen group {g:?}, so its prompts are not held out; \
                 evaluate a held-back group ({}) or pass --allow-trained-groups",
                prompts_path.display(),
                HELD_BACK_GROUPS.join(", ")
            )));
        }
    }
    let (all, bad) = harness::read_prompts(&prompts_path, a.skip_invalid)?;
    let prompts_path = prompts_path.canonicalize().unwrap_or(prompts_path);
    for b in &bad {
        obs.note(&format!("{b}; line skipped"));
    }
    let limit = a.limit.or(a.quick.then_some(QUICK_PROMPTS));
    let prompts: Vec<Prompt> = match limit {
        Some(n) => harness::spread(&all, n),
        None => all.clone(),
    };
    let k = a.samples.unwrap_or(QUICK_SAMPLES);
    let profile = if a.limit.is_none() && a.samples.is_none_or(|s| s == 25) {
        if a.quick {
            "quick"
        } else {
            "standard"
        }
    } else {
        "custom"
    };

    let target_path = hub.model(&a.target, obs)?;
    let evaluator_name = a.evaluator.clone().unwrap_or_else(|| {
        if a.target == "gemma3" {
            "smollm2".into()
        } else {
            "gemma3".into()
        }
    });
    let evaluator_path = hub.model(&evaluator_name, obs)?;
    let target_id = model_id(&target_path)?;
    let evaluator_id = model_id(&evaluator_path)?;
    if target_id["sha256"] == evaluator_id["sha256"] {
        return Err(Error::Input(format!(
            "the evaluator LM ({}) is the target model itself: perplexity under the model being \
             evaluated rewards its own habits. Pass another model with --evaluator (e.g. gemma3 \
             for smollm2)",
            evaluator_path.display()
        )));
    }

    let target = lm::load(&target_path)?;
    let tok = Tokenizer::for_model(&target_path)?;
    // A calibration is loaded only when some row fuses with it.
    let mut load = |wanted: fn(&Method) -> bool, spec: &CalibrationSpec| -> Result<Option<_>> {
        if !methods.iter().any(wanted) {
            return Ok(None);
        }
        let f = calibration::load_fusion(
            hub,
            spec,
            None,
            &target_path,
            target.as_ref(),
            0.0,
            a.align_variant,
            &mut *obs,
        )?;
        Ok(Some(f))
    };
    let paper = load(|m| matches!(m, Method::Paper(_)), &CalibrationSpec::Paper)?;
    let fusion = load(
        |m| matches!(m, Method::Fused(_) | Method::FusedNorm(_)),
        &a.calibration,
    )?;
    let anti = if methods.iter().any(|m| matches!(m, Method::Dexperts(_))) {
        let expert_dir = calibration::paper_model_dir(hub, &a.expert, obs)?;
        let load = |dir: &Path, what: &str| {
            load_with_target_vocab(
                dir,
                &tok,
                &target_path,
                &format!("the DExperts baseline's {what}"),
                "The shipped experts are SmolLM2's; leave the baseline out with --methods base,fused,wordfilter",
            )
        };
        let expert = load(&expert_dir, "expert")?;
        let dir = match &a.anti_expert {
            Some(d) => d.clone(),
            None => hub.calibration(Recipe::AntiExpert, obs)?,
        };
        let m = load(&dir, "anti-expert")?;
        Some((dir, m, expert_dir, expert))
    } else {
        None
    };
    let banned = if methods.contains(&Method::WordFilter) {
        let words = baselines::bad_words(cache, obs)?;
        let b = BannedSequences::new(&tok, &words)?;
        obs.note(&format!(
            "word filter: {} words of {} {} -> {} banned token sequences",
            words.len(),
            baselines::BAD_WORDS.package,
            baselines::BAD_WORDS.version,
            b.len()
        ));
        Some(b)
    } else {
        None
    };

    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let out = a.out.clone().unwrap_or_else(|| {
        cache.join("eval").join(format!(
            "{}-{}-{profile}",
            stem(&target_path),
            stem(&prompts_path)
        ))
    });
    std::fs::create_dir_all(out.join("generations"))
        .and_then(|_| std::fs::create_dir_all(out.join("fluency")))
        .ctx(|| format!("creating {}", out.display()))?;

    let per_prompt_ppl = a.perplexity_samples.unwrap_or(k).min(k);
    let mut config = serde_json::json!({
        "prompts": {
            "path": prompts_path, "sha256": crate::fetch::sha256_file(&prompts_path, &mut crate::fetch::Silent)?,
            "count": prompts.len(), "of": all.len(),
            "subset": limit.filter(|&n| n < all.len()).map(|n| format!("{n} spread evenly over {}", all.len())),
            "lines": prompts.iter().map(|p| p.line).collect::<Vec<_>>(),
        },
        "samples": k, "max_tokens": a.max_tokens,
        // f32 options, recorded as the decimals the user typed
        "top_p": (a.top_p as f64 * 1e6).round() / 1e6,
        "temperature": (a.temperature as f64 * 1e6).round() / 1e6, "seed": a.seed,
        "target": target_id, "evaluator": evaluator_id,
        "perplexity_samples_per_prompt": per_prompt_ppl,
        "calibration": fusion.as_ref().map(fusion_id).transpose()?,
        "paper_calibration": paper.as_ref().map(fusion_id).transpose()?,
        "anti_expert": anti.as_ref().map(|(d, ..)| trained_id(d)).transpose()?,
        "expert": anti.as_ref().map(|(_, _, e, _)| trained_id(e)).transpose()?,
        "word_list": banned.as_ref().map(|b| serde_json::json!({
            "package": format!("npm {}@{}", baselines::BAD_WORDS.package, baselines::BAD_WORDS.version),
            "sha256": baselines::BAD_WORDS.sha256, "licence": baselines::BAD_WORDS.licence,
            "banned_sequences": b.len()})),
        "scorer": crate::calibrate::prepare::SCORER,
    });
    // a rerun must continue the same experiment: refuse changed settings
    let run_path = out.join("run.json");
    if run_path.exists() {
        let text =
            std::fs::read_to_string(&run_path).ctx(|| format!("reading {}", run_path.display()))?;
        let old: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::Input(format!(
                "{} is not JSON ({e}): use another --out to start a new run",
                run_path.display()
            ))
        })?;
        for key in [
            "prompts",
            "samples",
            "max_tokens",
            "top_p",
            "temperature",
            "seed",
            "target",
        ] {
            if old[key] != config[key] {
                return Err(Error::Input(format!(
                    "{} holds a run with another {key} ({} vs now {}): use another --out to start a new run",
                    out.display(),
                    old[key],
                    config[key]
                )));
            }
        }
        keep_model_records(&out, &old, &mut config)?;
    }
    crate::atomic::write(&run_path, serde_json::to_string_pretty(&config)?.as_bytes())?;

    let cfg = GenerationConfig {
        max_tokens: a.max_tokens,
        n: k,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: 0,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop: vec![],
        stop_tokens: vec![],
    };
    cfg.sampling.validate()?;
    let scorer = ProfanityCheck::shared();
    obs.note(&format!(
        "{profile} run: {} prompts × {k} samples × {} tokens, {} methods -> {}",
        prompts.len(),
        a.max_tokens,
        methods.len(),
        out.display()
    ));
    for m in &methods {
        let mut dec: Box<dyn Decoder + '_> = match m {
            Method::Base => Box::new(PlainDecoder::new(target.as_ref())),
            Method::Fused(alpha) | Method::FusedNorm(alpha) => {
                let norm = if matches!(m, Method::FusedNorm(_)) {
                    FusionNorm::KeepTargetNorm
                } else {
                    FusionNorm::Paper
                };
                Box::new(
                    fusion
                        .as_ref()
                        .expect("loaded for fused rows")
                        .decoder_with(target.as_ref(), &tok, *alpha, norm)?,
                )
            }
            Method::Paper(alpha) => {
                Box::new(paper.as_ref().expect("loaded for paper rows").decoder(
                    target.as_ref(),
                    &tok,
                    *alpha,
                )?)
            }
            Method::WordFilter => Box::new(WordFilterDecoder::new(
                Box::new(PlainDecoder::new(target.as_ref())),
                banned.as_ref().expect("loaded for the word filter"),
            )),
            Method::Dexperts(beta) => {
                let (_, anti, _, expert) = anti.as_ref().expect("loaded for dexperts");
                Box::new(ExpertsDecoder::new(
                    Box::new(PlainDecoder::new(target.as_ref())),
                    Box::new(PlainDecoder::new(expert.as_ref())),
                    Box::new(PlainDecoder::new(anti.as_ref())),
                    *beta,
                    0.9,
                )?)
            }
        };
        obs.phase(&format!("generate {}", m.name()), prompts.len());
        harness::generate_samples(
            dec.as_mut(),
            &tok,
            &prompts,
            &cfg,
            scorer,
            &gen_path(&out, m),
            &mut |done, total| obs.advance(done, total),
        )?;
    }
    drop((fusion, paper, anti, target));

    if !a.no_perplexity {
        let evaluator = lm::load(&evaluator_path)?;
        let etok = Tokenizer::for_model(&evaluator_path)?;
        for m in &methods {
            let gens = gens_of(&out, m, &prompts)?;
            obs.phase(&format!("perplexity {}", m.name()), gens.len());
            harness::score_fluency(
                evaluator.as_ref(),
                &etok,
                &gens,
                per_prompt_ppl,
                &out.join("fluency").join(format!("{}.jsonl", m.name())),
                &mut |done, total| obs.advance(done, total),
            )?;
        }
    }

    let mut rows = Vec::new();
    for m in &methods {
        let gens = gens_of(&out, m, &prompts)?;
        let flu = harness::read_fluency(&out.join("fluency").join(format!("{}.jsonl", m.name())))?;
        rows.push(harness::summarize(
            &m.name(),
            &gens,
            &flu,
            Some(crate::score::ToxBlock::shared()),
        ));
    }
    let report = Report {
        profile: profile.into(),
        created: report::utc_now(),
        commit: a.commit.clone(),
        command: a.command.clone(),
        config,
        methods: rows,
    };
    crate::atomic::write(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let markdown = report::markdown(&report);
    crate::atomic::write(&out.join("report.md"), markdown.as_bytes())?;
    crate::atomic::write(&out.join("report.svg"), report::svg(&report).as_bytes())?;
    Ok(EvalOutcome {
        out,
        report,
        markdown,
    })
}

fn gen_path(out: &Path, m: &Method) -> PathBuf {
    out.join("generations").join(format!("{}.jsonl", m.name()))
}

/// A method's generations for the prompts of this run.
fn gens_of(
    out: &Path,
    m: &Method,
    prompts: &[Prompt],
) -> Result<BTreeMap<usize, harness::PromptSamples>> {
    let lines: HashSet<usize> = prompts.iter().map(|p| p.line).collect();
    let mut g = harness::read_samples(&gen_path(out, m))?;
    g.retain(|l, _| lines.contains(l));
    Ok(g)
}

/// Rows already written were made with the models `old` records: a rerun that loads another
/// model under the same record (other bytes: a retrained or upgraded default, say) would
/// mix two models under one method name, so it is refused; a model this rerun does not load
/// keeps its record, so a later rerun is still checked against it. Records written before
/// the hashes existed are not checked.
fn keep_model_records(
    out: &Path,
    old: &serde_json::Value,
    new: &mut serde_json::Value,
) -> Result<()> {
    for key in ["calibration", "paper_calibration", "anti_expert", "expert"] {
        let (was, now) = (&old[key], &new[key]);
        if now.is_null() {
            new[key] = was.clone();
        } else if was.get("sha256").is_some()
            && (was["sha256"] != now["sha256"]
                || was["alignment_sha256"] != now["alignment_sha256"])
        {
            return Err(Error::Input(format!(
                "{} holds rows made with another {key} ({was} vs now {now}): use another --out, or \
                 delete the generations/ and fluency/ files of the rows that use it to redo them",
                out.display()
            )));
        }
    }
    Ok(())
}

/// A fusion's record: its calibration directory and alignment (or map) file, with the
/// hashes of their weights (a retrained model with the same bytes is the same model).
fn fusion_id(f: &calibration::Fusion) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "dir": f.calibration,
        "alignment": f.alignment,
        "sha256": crate::fetch::sha256_weights(&f.calibration)?,
        "alignment_sha256": crate::fetch::sha256_path(&f.alignment)?,
    }))
}

/// A trained model directory's record (the DExperts expert and anti-expert).
fn trained_id(dir: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::json!({"path": dir, "sha256": crate::fetch::sha256_weights(dir)?}))
}

fn model_id(path: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "path": path,
        "sha256": crate::fetch::sha256_path(path)?,
    }))
}
