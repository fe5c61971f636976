//! An evaluation run as a user asks for it (the CLI's `eval` flags are derived from here
//! under the `clap` feature): names and lists as given, turned into an [`EvalPlan`].

use std::path::PathBuf;

use super::protocol::{EvalPlan, Method};
use crate::align::Variant;
use crate::calibration::CalibrationSpec;
use crate::error::Result;

#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct EvalOptions {
    /// The target model: a .gguf file, a Hugging Face directory or a fetched name.
    #[cfg_attr(feature = "clap", arg(long, short, default_value = "smollm2"))]
    pub model: String,
    /// Prompt file: RealToxicityPrompts-style JSONL, or a ToxiGen hate_*.txt file.
    /// Default: <data>/rtp/challenging-toxic-1196.jsonl.
    #[cfg_attr(feature = "clap", arg(long))]
    pub prompts: Option<PathBuf>,
    /// Quick profile: 40 prompts spread evenly over the file, 25 samples each (labelled
    /// "quick" in every output). Without it: every prompt, 25 samples (the standard protocol).
    #[cfg_attr(feature = "clap", arg(long))]
    pub quick: bool,
    /// Use at most this many prompts, spread evenly over the file (overrides the profile).
    #[cfg_attr(feature = "clap", arg(long))]
    pub limit: Option<usize>,
    /// Samples per prompt (k; standard 25).
    #[cfg_attr(feature = "clap", arg(long, short = 'k'))]
    pub samples: Option<usize>,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 20))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.9))]
    pub top_p: f32,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1.0))]
    pub temperature: f32,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Methods to run: base, fused (one row per --alphas value), fusednorm (the same, each
    /// fused state rescaled to the target state's norm; not in the paper), paper (the paper
    /// recipe's model, one row per --paper-alphas value), wordfilter, dexperts (not by
    /// default: its expert and anti-expert train on first use, ~1.5 h on 2 cores).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', default_values_t = ["base".to_string(), "fused".into(), "wordfilter".into()]))]
    pub methods: Vec<String>,
    /// Fusion strengths for the fused rows.
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', default_values_t = [0.1, 0.2, 0.3]))]
    pub alphas: Vec<f64>,
    /// Alphas of the `paper` rows: the paper recipe's calibration model with its alignment
    /// (trained on first use, ~50 min), the comparison the issue asks for at its best alpha.
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', default_values_t = [0.1]))]
    pub paper_alphas: Vec<f64>,
    /// Calibration for the fused rows: "default" (the shipped fusion-aware calibration, no
    /// training), "fused" (the one `calibrate --recipe fused` trains here, on first use),
    /// "paper" (the paper recipe's model, trained on first use), or a directory.
    #[cfg_attr(feature = "clap", arg(long, default_value = "default"))]
    pub calibration: String,
    /// DExperts expert: a paper-recipe calibration model directory (a language model with
    /// its own head), or "paper" (the paper recipe's default model, trained on first use).
    #[cfg_attr(feature = "clap", arg(long, default_value = "paper"))]
    pub expert: String,
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Variant::Hidden))]
    pub align_variant: Variant,
    /// DExperts anti-expert: a calibration-trainer model directory trained on toxic text
    /// ("default" = trained on first use from `detoxfuse corpus toxic`, same budget as the
    /// calibration model).
    #[cfg_attr(feature = "clap", arg(long, default_value = "default"))]
    pub anti_expert: String,
    /// DExperts strengths, one row each: logits = base + beta · (expert − anti-expert)
    /// (DExperts' paper uses 2 with GPT-2-sized experts).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0]))]
    pub dexperts_beta: Vec<f32>,
    /// Evaluator LM for perplexity; must not be the target (default: gemma3 for other
    /// targets, smollm2 for gemma3).
    #[cfg_attr(feature = "clap", arg(long))]
    pub evaluator: Option<String>,
    /// Score the perplexity of the first N samples of each prompt (default: all of them).
    #[cfg_attr(feature = "clap", arg(long))]
    pub perplexity_samples: Option<usize>,
    /// Generate and score toxicity only; no perplexity.
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_perplexity: bool,
    /// Output directory (default: <cache>/eval/<target>-<prompts>-<profile>). Rerunning with
    /// the same directory skips finished work.
    #[cfg_attr(feature = "clap", arg(long, short))]
    pub out: Option<PathBuf>,
    /// Evaluate the valid lines of a prompt file that has invalid ones (they are listed).
    #[cfg_attr(feature = "clap", arg(long))]
    pub skip_invalid: bool,
    /// Evaluate a ToxiGen file of a group the calibration corpora train on (refused by
    /// default: its statements are training data, not held-out prompts).
    #[cfg_attr(feature = "clap", arg(long))]
    pub allow_trained_groups: bool,
}

impl EvalOptions {
    /// The run these options ask for; `command` and `commit` (the command line and the source
    /// revision) are recorded in its report.
    pub fn plan(self, command: String, commit: String) -> Result<EvalPlan> {
        Ok(EvalPlan {
            methods: Method::parse_list(
                &self.methods,
                &self.alphas,
                &self.paper_alphas,
                &self.dexperts_beta,
            )?,
            target: self.model,
            evaluator: self.evaluator,
            prompts: self.prompts,
            quick: self.quick,
            limit: self.limit,
            samples: self.samples,
            max_tokens: self.max_tokens,
            top_p: self.top_p,
            temperature: self.temperature,
            seed: self.seed,
            calibration: CalibrationSpec::parse(&self.calibration),
            align_variant: self.align_variant,
            expert: CalibrationSpec::parse(&self.expert),
            anti_expert: (self.anti_expert != "default").then(|| PathBuf::from(&self.anti_expert)),
            perplexity_samples: self.perplexity_samples,
            no_perplexity: self.no_perplexity,
            out: self.out,
            skip_invalid: self.skip_invalid,
            allow_trained_groups: self.allow_trained_groups,
            command,
            commit,
        })
    }
}
