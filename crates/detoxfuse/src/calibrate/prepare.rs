//! Training data as files with manifests: the clean corpus, the anti-expert's toxic corpus,
//! the unlikelihood pairs and the fused recipe's self-generated data. Each builder writes its
//! file atomically, writes a manifest beside it (sources, options, sha256) and returns a
//! summary for the caller to print; none of them reads RealToxicityPrompts except the
//! self-generated data's leakage guard, which drops any prompt that appears there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::corpus::{self, CorpusOptions};
use super::data::Record;
use super::guard::LeakageGuard;
use super::probe;
use super::selfgen::{self, SelfGenConfig};
use crate::error::{Error, IoContext, Result};
use crate::fetch::{sha256_file, Progress, Silent};
use crate::hub::Hub;
use crate::score::ProfanityCheck;

/// The scorer every data builder filters with (named in each manifest).
pub const SCORER: &str = "alt-profanity-check 1.9.1 (Rust port; lexical)";

/// Writes `manifest` beside the corpus file `out` (as `*.manifest.json`) and returns its path.
pub fn write_manifest(out: &Path, manifest: &serde_json::Value) -> Result<PathBuf> {
    let mpath = out.with_extension("manifest.json");
    crate::atomic::write(&mpath, serde_json::to_string_pretty(manifest)?.as_bytes())?;
    Ok(mpath)
}

/// What [`build_corpus`] wrote.
#[derive(Debug, Clone)]
pub struct CorpusSummary {
    pub records: usize,
    pub manifest_path: PathBuf,
    pub manifest: serde_json::Value,
    pub seconds: f64,
}

/// Per source and for the paired data, what was kept and dropped (as `detoxfuse corpus
/// build` prints it).
impl std::fmt::Display for CorpusSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.manifest;
        for src in m["sources"].as_array().into_iter().flatten() {
            let name = src["source"]["name"].as_str().unwrap_or("?");
            writeln!(f, "{name:<13} {}", src["stats"])?;
        }
        let p = &m["paired"];
        if !p.is_null() {
            writeln!(
                f,
                "paired        sampled {} kept {} (dropped: toxic {}, restating {}, short {})",
                p["sampled"],
                p["kept"],
                p["dropped_toxic"],
                p["dropped_restating"],
                p["dropped_short"]
            )?;
        }
        write!(
            f,
            "{} records (manifest {}) in {:.0} s",
            self.records,
            self.manifest_path.display(),
            self.seconds
        )
    }
}

/// Builds the clean corpus at `out` (and its manifest beside it): every clean source
/// fetched, split and filtered, plus (with `opts.paired_samples > 0`) the `target`'s replies
/// to ToxiGen statements of the groups not held back.
pub fn build_corpus(
    hub: &Hub,
    out: &Path,
    opts: &CorpusOptions,
    target: &str,
    data: &Path,
    progress: &mut dyn Progress,
) -> Result<CorpusSummary> {
    if !(0.0..=1.0).contains(&opts.threshold) {
        return Err(Error::Input(format!(
            "--threshold {} is not a probability in [0, 1]",
            opts.threshold
        )));
    }
    let t0 = Instant::now();
    let scorer = ProfanityCheck::shared();
    let (mut records, sources) = corpus::clean_passages(hub.cache(), scorer, opts, progress)?;
    let paired = if opts.paired_samples > 0 {
        let target = hub.model(target, progress)?;
        let dir = data.join("toxigen");
        let (pairs, manifest) = corpus::paired_records(&target, &dir, scorer, opts, progress)?;
        records.extend(pairs);
        manifest
    } else {
        serde_json::Value::Null
    };
    corpus::write_jsonl(out, &records)?;
    let sha = sha256_file(out, &mut Silent)?;
    let manifest = serde_json::json!({
        "detoxfuse_version": env!("CARGO_PKG_VERSION"),
        "corpus": out, "sha256": sha, "records": records.len(),
        "scorer": SCORER,
        "options": opts, "sources": sources, "paired": paired,
        "fortune_topics_dropped": corpus::FORTUNE_TOPICS_DROPPED,
        "never_read": "RealToxicityPrompts (evaluation data)",
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let manifest_path = write_manifest(out, &manifest)?;
    Ok(CorpusSummary {
        records: records.len(),
        manifest_path,
        manifest,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes the anti-expert corpus and its manifest; returns the number of records.
pub fn build_toxic_corpus(
    hub: &Hub,
    out: &Path,
    data: &Path,
    threshold: f64,
    progress: &mut dyn Progress,
) -> Result<usize> {
    let (records, mut manifest) = corpus::toxic_records(
        hub.cache(),
        &data.join("toxigen"),
        ProfanityCheck::shared(),
        threshold,
        progress,
    )?;
    corpus::write_jsonl(out, &records)?;
    manifest["corpus"] = serde_json::json!(out);
    manifest["sha256"] = sha256_file(out, &mut Silent)?.into();
    write_manifest(out, &manifest)?;
    Ok(records.len())
}

/// Writes the unlikelihood corpus and its manifest: every list of every ToxiGen `kind`
/// ("hate", or "neutral" for contrast data) group except the held-back ones (which the probe
/// reads). Returns the number of pairs.
pub fn build_unlikely_corpus(out: &Path, data: &Path, kind: &str) -> Result<usize> {
    let toxigen = data.join("toxigen");
    let records = probe::list_pairs(
        &toxigen,
        kind,
        |g| !corpus::HELD_BACK_GROUPS.contains(&g),
        usize::MAX,
    )?;
    let mut groups: Vec<&str> = records
        .iter()
        .filter_map(|r| match r {
            Record::Pair { source, .. } => Some(source.as_str()),
            _ => None,
        })
        .collect();
    groups.dedup();
    corpus::write_jsonl(out, &records)?;
    let purpose = if kind == "hate" {
        "unlikelihood data for `detoxfuse calibrate --unlikelihood` (toxic on purpose: \
         the continuations are what the calibration model learns to avoid)"
    } else {
        "contrast data: neutral lists in the unlikelihood data's format, trained as ordinary text"
    };
    let manifest = serde_json::json!({
        "purpose": purpose,
        "kind": kind,
        "format": "prompt = a ToxiGen list but its last statement, as `- ` lines; completion = the last statement",
        "toxigen_dir": toxigen,
        "sources": groups,
        "held_back_groups": corpus::HELD_BACK_GROUPS,
        "records": records.len(),
        "sha256": sha256_file(out, &mut Silent)?,
        "never_read": "RealToxicityPrompts (evaluation data)",
    });
    write_manifest(out, &manifest)?;
    Ok(records.len())
}

/// What [`build_selfgen`] wrote.
#[derive(Debug, Clone)]
pub struct SelfGenSummary {
    pub samples_path: PathBuf,
    pub records: usize,
    pub samples: usize,
    pub toxic_samples: usize,
    /// The toxicity at or above which a continuation counts as toxic.
    pub toxic_threshold: f64,
    pub seconds: f64,
}

/// The line `detoxfuse corpus selfgen` ends with.
impl std::fmt::Display for SelfGenSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} prompts, {} continuations ({} at toxicity >= {}) -> {} in {:.0} s",
            self.records,
            self.samples,
            self.toxic_samples,
            self.toxic_threshold,
            self.samples_path.display(),
            self.seconds
        )
    }
}

/// Builds (or resumes) the self-generated data in `out`: toxic-leaning and neutral prompts
/// (HH-RLHF, ToxiGen; the leakage guard drops any RealToxicityPrompts match), each continued
/// by `target` and every continuation scored. `progress(done, total)` after each prompt.
pub fn build_selfgen(
    target: &Path,
    out: &Path,
    data: &Path,
    cfg: &SelfGenConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SelfGenSummary> {
    std::fs::create_dir_all(out).ctx(|| format!("creating {}", out.display()))?;
    let t0 = Instant::now();
    let scorer = ProfanityCheck::shared();
    let guard = LeakageGuard::from_rtp_dir(&data.join("rtp"))?;
    let (prompts, stats) = selfgen::build_prompts(
        &data.join("hh-rlhf").join("harmless-base-test.jsonl.gz"),
        &data.join("toxigen"),
        &guard,
        scorer,
        cfg,
    )?;
    let model = crate::lm::load(target)?;
    let tok = crate::text::Tokenizer::for_model(target)?;
    let samples_path = out.join("samples.jsonl");
    let recs = selfgen::sample_prompts(
        model.as_ref(),
        &tok,
        &prompts,
        scorer,
        cfg,
        &samples_path,
        progress,
    )?;
    let n: usize = recs.iter().map(|r| r.samples.len()).sum();
    let toxic = recs
        .iter()
        .flat_map(|r| &r.samples)
        .filter(|s| s.toxicity >= cfg.toxic_threshold)
        .count();
    let manifest = serde_json::json!({
        "purpose": "self-generated data of `calibrate --recipe fused` (toxic on purpose: the toxic continuations are what the fused model learns to avoid)",
        "target": target,
        "target_sha256": sha256_file(target, &mut Silent)?,
        "data_dir": data,
        "config": cfg,
        "prompts": stats,
        "held_back_groups": corpus::HELD_BACK_GROUPS,
        "leakage_guard": {"files": guard.files, "prompts": guard.len()},
        "records": recs.len(),
        "samples": n,
        "toxic_samples": toxic,
        "samples_sha256": sha256_file(&samples_path, &mut Silent)?,
        "scorer": SCORER,
    });
    crate::atomic::write(
        &out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(SelfGenSummary {
        samples_path,
        records: recs.len(),
        samples: n,
        toxic_samples: toxic,
        toxic_threshold: cfg.toxic_threshold,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
