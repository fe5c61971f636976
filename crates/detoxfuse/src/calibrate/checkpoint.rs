//! Checkpoints and logs of a training run, shared by both trainers: parameters and
//! optimizer moments in `checkpoint-{step}.safetensors`, committed by atomically replacing
//! `checkpoint.json` (the only commit point: a crash before it leaves the previous
//! checkpoint in force), and `log.jsonl`, cut back to the checkpoint on resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::optim::AdamW;
use crate::error::{Error, IoContext, Result};

/// Makes sure `dir` exists and is writable before hours of work depend on it.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Input(format!(
            "cannot create output directory {}: {e}; choose a writable --out",
            dir.display()
        ))
    })?;
    tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        Error::Input(format!(
            "output directory {} is not writable: {e}; choose a writable --out",
            dir.display()
        ))
    })?;
    Ok(())
}

/// Trains a calibration model from `base` on `corpus`, writing to `out`.
/// Writes parameters and optimizer moments as `checkpoint-{step}.safetensors` (temporary
/// file, fsync, rename) and returns the file name. Nothing refers to it until
/// [`commit_record`] names it.
pub fn save_state(
    out: &Path,
    step: usize,
    vars: &std::collections::BTreeMap<String, candle_core::Var>,
    opt: &AdamW,
) -> Result<String> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in vars {
        t.insert(format!("param.{name}"), var.as_tensor().clone());
        t.insert(format!("m.{name}"), opt.m[name].clone());
        t.insert(format!("v.{name}"), opt.v[name].clone());
    }
    let file = format!("checkpoint-{step:06}.safetensors");
    crate::atomic::write_safetensors(&out.join(&file), &t)?;
    Ok(file)
}

/// Atomically replaces `checkpoint.json` by `record` (the commit point of a checkpoint),
/// then removes the previous checkpoint's tensor file. If the record cannot be written (a
/// full disk), the new tensor file is removed and the previous checkpoint stays the run's.
pub fn commit_record<R: serde::Serialize>(
    out: &Path,
    record: &R,
    previous: &str,
    current: &str,
) -> Result<()> {
    let written = crate::atomic::write(
        &out.join("checkpoint.json"),
        serde_json::to_string_pretty(record)?.as_bytes(),
    );
    if let Err(e) = written {
        if previous != current {
            let _ = std::fs::remove_file(out.join(current));
        }
        return Err(e);
    }
    if !previous.is_empty() && previous != current {
        let _ = std::fs::remove_file(out.join(previous));
    }
    Ok(())
}

/// Reads parameters and optimizer moments written by [`save_state`] back into `vars` and
/// `opt`.
pub fn load_state(
    file: &Path,
    vars: &std::collections::BTreeMap<String, candle_core::Var>,
    opt: &mut AdamW,
    step: usize,
) -> Result<()> {
    let t = candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| {
        Error::Input(format!(
            "--resume: {} is unreadable ({e}); start again without --resume",
            file.display()
        ))
    })?;
    for (name, var) in vars {
        let get = |k: String| {
            t.get(&k)
                .cloned()
                .ok_or_else(|| Error::Input(format!("--resume: {} lacks {k}", file.display())))
        };
        var.set(&get(format!("param.{name}"))?)?;
        opt.m.insert(name.clone(), get(format!("m.{name}"))?);
        opt.v.insert(name.clone(), get(format!("v.{name}"))?);
    }
    opt.step = step;
    Ok(())
}

/// Opens a run's `log.jsonl` for appending: resuming from `Some(step)` drops the lines
/// written after that checkpoint, a fresh run (`None`) starts an empty log.
pub fn open_log(path: &Path, resumed_at: Option<usize>) -> Result<crate::jsonl::Appender> {
    match resumed_at {
        Some(step) => truncate_log(path, step)?,
        None if path.exists() => {
            std::fs::remove_file(path).ctx(|| format!("removing {}", path.display()))?
        }
        None => {}
    }
    crate::jsonl::Appender::open(path, false)
}

/// Drops log lines past `step` (written after the checkpoint a run resumes from).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    crate::atomic::write(
        path,
        kept.iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .as_bytes(),
    )
}
