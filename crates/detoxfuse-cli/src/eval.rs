//! `detoxfuse eval`: the field's protocol (EVALUATION.md) for the untouched target, the fused
//! model at several alphas and the two baselines, in one resumable run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use detoxfuse::calibrate::corpus::{toxigen_group, HELD_BACK_GROUPS};
use detoxfuse::eval::baselines::{self, BannedSequences, ExpertsDecoder, WordFilterDecoder};
use detoxfuse::eval::harness::{self, Prompt};
use detoxfuse::eval::report::{self, Report};
use detoxfuse::eval::score::ProfanityCheck;
use detoxfuse::fuse::same_tokenizer;
use detoxfuse::generate::{Decoder, GenerationConfig, PlainDecoder};
use detoxfuse::lm;
use detoxfuse::sample::SamplingParams;
use detoxfuse::text::Tokenizer;
use indicatif::ProgressBar;

use crate::calibrate::data_dir;
use crate::{Bar, ModelArg};

/// Prompts and samples of the `--quick` profile.
const QUICK_PROMPTS: usize = 40;
const QUICK_SAMPLES: usize = 25;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The target model: a .gguf file, a Hugging Face directory or a fetched name.
    #[command(flatten)]
    model: ModelArg,
    /// Prompt file: RealToxicityPrompts-style JSONL, or a ToxiGen hate_*.txt file.
    /// Default: <data>/rtp/challenging-toxic-1196.jsonl.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Quick profile: 40 prompts spread evenly over the file, 25 samples each (labelled
    /// "quick" in every output). Without it: every prompt, 25 samples (the standard protocol).
    #[arg(long)]
    quick: bool,
    /// Use at most this many prompts, spread evenly over the file (overrides the profile).
    #[arg(long)]
    limit: Option<usize>,
    /// Samples per prompt (k; standard 25).
    #[arg(long, short = 'k')]
    samples: Option<usize>,
    #[arg(long, default_value_t = 20)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Methods to run: base, fused (one row per --alphas value), fusednorm (the same, each
    /// fused state rescaled to the target state's norm; not in the paper), wordfilter,
    /// dexperts (not by default: its expert and anti-expert train on first use, ~1.5 h on
    /// 2 cores).
    #[arg(long, value_delimiter = ',', default_values_t = ["base".to_string(), "fused".into(), "wordfilter".into()])]
    methods: Vec<String>,
    /// Fusion strengths for the fused rows.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.2, 0.3])]
    alphas: Vec<f64>,
    /// Calibration for the fused rows: "default" (the shipped fusion-aware calibration, no training), "fused" (the one
    /// `calibrate --recipe fused` trains here, on first use), "paper" (the paper recipe's model,
    /// trained on first use), or a directory.
    #[arg(long, default_value = "default")]
    calibration: String,
    /// DExperts expert: a paper-recipe calibration model directory (a language model with
    /// its own head), or "paper" (the paper recipe's default model, trained on first use).
    #[arg(long, default_value = "paper")]
    expert: String,
    #[arg(long, value_enum, default_value_t = crate::align::VariantArg::Hidden)]
    align_variant: crate::align::VariantArg,
    /// DExperts anti-expert: a calibration-trainer model directory trained on toxic text
    /// ("default" = trained on first use from `detoxfuse corpus toxic`, same budget as the
    /// calibration model).
    #[arg(long, default_value = "default")]
    anti_expert: String,
    /// DExperts strengths, one row each: logits = base + beta · (expert − anti-expert)
    /// (DExperts' paper uses 2 with GPT-2-sized experts).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0])]
    dexperts_beta: Vec<f32>,
    /// Evaluator LM for perplexity; must not be the target (default: gemma3 for other
    /// targets, smollm2 for gemma3).
    #[arg(long)]
    evaluator: Option<String>,
    /// Score the perplexity of the first N samples of each prompt (default: all of them).
    #[arg(long)]
    perplexity_samples: Option<usize>,
    /// Generate and score toxicity only; no perplexity.
    #[arg(long)]
    no_perplexity: bool,
    /// Output directory (default: <cache>/eval/<target>-<prompts>-<profile>). Rerunning with
    /// the same directory skips finished work.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Evaluate the valid lines of a prompt file that has invalid ones (they are listed).
    #[arg(long)]
    skip_invalid: bool,
    /// Evaluate a ToxiGen file of a group the calibration corpora train on (refused by
    /// default: its statements are training data, not held-out prompts).
    #[arg(long)]
    allow_trained_groups: bool,
}

/// One row of the evaluation.
#[derive(Debug, Clone, PartialEq)]
enum Method {
    Base,
    Fused(f64),
    FusedNorm(f64),
    WordFilter,
    Dexperts(f32),
}

impl Method {
    fn name(&self) -> String {
        match self {
            Method::Base => "base".into(),
            Method::Fused(a) => format!("fused-a{a}"),
            Method::FusedNorm(a) => format!("fused-norm-a{a}"),
            Method::WordFilter => "wordfilter".into(),
            Method::Dexperts(b) => format!("dexperts-b{b}"),
        }
    }
}

fn methods(a: &EvalArgs) -> Result<Vec<Method>> {
    let mut out = Vec::new();
    for m in &a.methods {
        match m.as_str() {
            "base" => out.push(Method::Base),
            "fused" | "fusednorm" => {
                for &alpha in &a.alphas {
                    if !(0.0..=1.0).contains(&alpha) {
                        bail!("--alphas: {alpha} is outside [0, 1]");
                    }
                    out.push(if m == "fused" {
                        Method::Fused(alpha)
                    } else {
                        Method::FusedNorm(alpha)
                    });
                }
            }
            "wordfilter" => out.push(Method::WordFilter),
            "dexperts" => {
                for &beta in &a.dexperts_beta {
                    if !(beta.is_finite() && beta >= 0.0) {
                        bail!("--dexperts-beta: {beta} is not a finite number >= 0");
                    }
                    out.push(Method::Dexperts(beta));
                }
            }
            other => bail!(
                "--methods: unknown method {other:?}; choose from base, fused, fusednorm, wordfilter, dexperts"
            ),
        }
    }
    Ok(out)
}

/// The anti-expert directory ("default": trained now if missing).
fn anti_expert_dir(cache: &Path, arg: &str) -> Result<PathBuf> {
    if arg != "default" {
        return Ok(PathBuf::from(arg));
    }
    crate::calibrate::recipe_dir(cache, detoxfuse::recipes::Recipe::AntiExpert)
}

fn bar(total: usize, what: &str) -> ProgressBar {
    crate::progress_bar(total as u64, &format!("{what:>22}"), Some("prompts"))
}

/// Moves the bar; when stderr is not a terminal (a run under nohup, a log file) the bar is
/// invisible, so a plain progress line goes out every 50 prompts instead.
fn advance(pb: &ProgressBar, done: usize, total: usize) {
    let resumed = pb.position() == 0 && done > 0;
    pb.set_position(done as u64);
    if resumed {
        // prompts finished by an earlier run say nothing about this run's rate
        pb.reset_eta();
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stderr())
        && done > 0
        && (done.is_multiple_of(50) || done == total)
    {
        eprintln!(
            "{}: {done}/{total} prompts, {:.0} s elapsed, eta {:.0} s",
            pb.prefix().trim(),
            pb.elapsed().as_secs_f64(),
            pb.eta().as_secs_f64()
        );
    }
}

fn model_id(path: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "path": path,
        "sha256": detoxfuse::fetch::sha256_path(path)?,
    }))
}

/// The source revision this binary was built from (recorded by `build.rs`).
fn commit() -> String {
    env!("DETOXFUSE_COMMIT").to_string()
}

pub fn run(cache: &Path, a: EvalArgs) -> Result<()> {
    let methods = methods(&a)?;
    let prompts_path = match a.prompts.clone() {
        Some(p) => p,
        None => data_dir(cache, None)?
            .join("rtp")
            .join("challenging-toxic-1196.jsonl"),
    };
    let file_name = prompts_path.file_name().and_then(|n| n.to_str());
    if let Some((_, g)) = file_name.and_then(toxigen_group) {
        if !HELD_BACK_GROUPS.contains(&g) && !a.allow_trained_groups {
            bail!(
                "{}: the calibration corpora (paired replies, unlikelihood pairs) and the \
                 anti-expert train on ToxiGen group {g:?}, so its prompts are not held out; \
                 evaluate a held-back group ({}) or pass --allow-trained-groups",
                prompts_path.display(),
                HELD_BACK_GROUPS.join(", ")
            );
        }
    }
    let (all, bad) = harness::read_prompts(&prompts_path, a.skip_invalid)?;
    let prompts_path = prompts_path.canonicalize().unwrap_or(prompts_path);
    for b in &bad {
        eprintln!("{b}; line skipped");
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

    let target_path = a.model.resolve(cache)?;
    let evaluator_name = a.evaluator.clone().unwrap_or_else(|| {
        if a.model.model == "gemma3" {
            "smollm2".into()
        } else {
            "gemma3".into()
        }
    });
    let evaluator_path = ModelArg {
        model: evaluator_name,
    }
    .resolve(cache)?;
    let target_id = model_id(&target_path)?;
    let evaluator_id = model_id(&evaluator_path)?;
    if target_id["sha256"] == evaluator_id["sha256"] {
        bail!(
            "the evaluator LM ({}) is the target model itself: perplexity under the model being \
             evaluated rewards its own habits. Pass another model with --evaluator (e.g. gemma3 \
             for smollm2)",
            evaluator_path.display()
        );
    }

    let target = lm::load(&target_path)?;
    let tok = Tokenizer::for_model(&target_path)?;
    let needs_cal = methods
        .iter()
        .any(|m| matches!(m, Method::Fused(_) | Method::FusedNorm(_)));
    let fusion = if needs_cal {
        Some(crate::align::load_fusion(
            cache,
            &a.calibration,
            None,
            &target_path,
            target.as_ref(),
            0.0,
            a.align_variant.into(),
        )?)
    } else {
        None
    };
    let anti = if methods.iter().any(|m| matches!(m, Method::Dexperts(_))) {
        let expert_dir = crate::align::calibration_dir(cache, &a.expert)?;
        let expert = lm::load(&expert_dir)
            .with_context(|| format!("loading the DExperts expert {}", expert_dir.display()))?;
        let expert_tok = Tokenizer::for_model(&expert_dir)?;
        if !same_tokenizer(&tok, &expert_tok) {
            bail!(
                "the DExperts baseline needs experts with the target's vocabulary; the experts are \
                 trained from SmolLM2 and {} has another tokenizer. Leave it out with --methods base,fused,wordfilter",
                target_path.display()
            );
        }
        let dir = anti_expert_dir(cache, &a.anti_expert)?;
        let m =
            lm::load(&dir).with_context(|| format!("loading the anti-expert {}", dir.display()))?;
        Some((dir, m, expert_dir, expert))
    } else {
        None
    };
    let banned = if methods.contains(&Method::WordFilter) {
        let words = baselines::bad_words(cache, &mut Bar::counting())?;
        let b = BannedSequences::new(&tok, &words)?;
        eprintln!(
            "word filter: {} words of {} {} -> {} banned token sequences",
            words.len(),
            baselines::BAD_WORDS.package,
            baselines::BAD_WORDS.version,
            b.len()
        );
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
        .with_context(|| format!("creating {}", out.display()))?;

    let per_prompt_ppl = a.perplexity_samples.unwrap_or(k).min(k);
    let config = serde_json::json!({
        "prompts": {
            "path": prompts_path, "sha256": detoxfuse::fetch::sha256_file(&prompts_path, &mut detoxfuse::fetch::Silent)?,
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
        "calibration": fusion.as_ref().map(|f| serde_json::json!({"dir": f.calibration, "alignment": f.alignment})),
        "anti_expert": anti.as_ref().map(|(d, ..)| d),
        "expert": anti.as_ref().map(|(_, _, e, _)| e),
        "word_list": banned.as_ref().map(|b| serde_json::json!({
            "package": format!("npm {}@{}", baselines::BAD_WORDS.package, baselines::BAD_WORDS.version),
            "sha256": baselines::BAD_WORDS.sha256, "licence": baselines::BAD_WORDS.licence,
            "banned_sequences": b.len()})),
        "scorer": "alt-profanity-check 1.9.1 (Rust port; lexical)",
    });
    // a rerun must continue the same experiment: refuse changed settings
    let run_path = out.join("run.json");
    if run_path.exists() {
        let old: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&run_path)
                .with_context(|| format!("reading {}", run_path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", run_path.display()))?;
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
                bail!(
                    "{} holds a run with another {key} ({} vs now {}): use another --out to start a new run",
                    out.display(),
                    old[key],
                    config[key]
                );
            }
        }
    }
    detoxfuse::atomic::write(&run_path, serde_json::to_string_pretty(&config)?.as_bytes())?;

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
    eprintln!(
        "{profile} run: {} prompts × {k} samples × {} tokens, {} methods -> {}",
        prompts.len(),
        a.max_tokens,
        methods.len(),
        out.display()
    );
    for m in &methods {
        let mut dec: Box<dyn Decoder + '_> = match m {
            Method::Base => Box::new(PlainDecoder::new(target.as_ref())),
            Method::Fused(alpha) | Method::FusedNorm(alpha) => {
                let norm = if matches!(m, Method::FusedNorm(_)) {
                    detoxfuse::fuse::FusionNorm::KeepTargetNorm
                } else {
                    detoxfuse::fuse::FusionNorm::Paper
                };
                Box::new(
                    fusion
                        .as_ref()
                        .expect("loaded for fused rows")
                        .decoder_with(target.as_ref(), &tok, *alpha, norm)?,
                )
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
        let pb = bar(prompts.len(), &format!("generate {}", m.name()));
        harness::generate_samples(
            dec.as_mut(),
            &tok,
            &prompts,
            &cfg,
            scorer,
            &gen_path(&out, m),
            &mut |done, total| advance(&pb, done, total),
        )?;
        pb.finish_and_clear();
    }
    drop((fusion, anti, target));

    if !a.no_perplexity {
        let evaluator = lm::load(&evaluator_path)?;
        let etok = Tokenizer::for_model(&evaluator_path)?;
        for m in &methods {
            let gens = gens_of(&out, m, &prompts)?;
            let pb = bar(gens.len(), &format!("perplexity {}", m.name()));
            harness::score_fluency(
                evaluator.as_ref(),
                &etok,
                &gens,
                per_prompt_ppl,
                &out.join("fluency").join(format!("{}.jsonl", m.name())),
                &mut |done, total| advance(&pb, done, total),
            )?;
            pb.finish_and_clear();
        }
    }

    let mut rows = Vec::new();
    for m in &methods {
        let gens = gens_of(&out, m, &prompts)?;
        let flu = harness::read_fluency(&out.join("fluency").join(format!("{}.jsonl", m.name())))?;
        rows.push(harness::summarize(&m.name(), &gens, &flu));
    }
    let report = Report {
        profile: profile.into(),
        created: report::utc_now(),
        commit: commit(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        config,
        methods: rows,
    };
    detoxfuse::atomic::write(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let md = report::markdown(&report);
    detoxfuse::atomic::write(&out.join("report.md"), md.as_bytes())?;
    detoxfuse::atomic::write(&out.join("report.svg"), report::svg(&report).as_bytes())?;
    println!("{md}");
    println!(
        "report: {0}/report.md, {0}/report.json, {0}/report.svg; generations in {0}/generations/",
        out.display()
    );
    Ok(())
}

fn gen_path(out: &Path, m: &Method) -> PathBuf {
    out.join("generations").join(format!("{}.jsonl", m.name()))
}

/// A method's generations for the prompts of this run.
fn gens_of(
    out: &Path,
    m: &Method,
    prompts: &[Prompt],
) -> Result<std::collections::BTreeMap<usize, harness::PromptSamples>> {
    let lines: std::collections::HashSet<usize> = prompts.iter().map(|p| p.line).collect();
    let mut g = harness::read_samples(&gen_path(out, m))?;
    g.retain(|l, _| lines.contains(l));
    Ok(g)
}
