//! JSON Lines files written one record at a time (generations, evaluation stages,
//! self-generated data, training logs): each record goes out as one whole line in one write
//! and is synced to disk, so an interrupted run (a crash, kill −9, a full disk) leaves complete
//! records and at most a torn last line, which [`complete_records`] cuts off before a resumed
//! run appends.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// The complete JSON records of a JSONL file written line by line; a torn last line (from an
/// interrupted write) is cut off the file so that appending continues cleanly. A missing
/// file has none.
pub fn complete_records(path: &Path) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).ctx(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut good_len = 0;
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            break;
        };
        out.push(v);
        good_len += line.len();
    }
    if good_len < text.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .ctx(|| format!("opening {}", path.display()))?;
        f.set_len(good_len as u64)
            .ctx(|| format!("truncating the torn last line of {}", path.display()))?;
    }
    Ok(out)
}

/// A JSONL file open for appending whole, synced records.
pub struct Appender {
    file: File,
    path: PathBuf,
}

impl Appender {
    /// Opens `path` for appending (created if missing; emptied first with `truncate`).
    pub fn open(path: &Path, truncate: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(path)
            .ctx(|| format!("opening {} for writing", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `v` as one line and syncs it.
    pub fn append(&mut self, v: &impl serde::Serialize) -> Result<()> {
        let mut line = serde_json::to_string(v)?;
        line.push('\n');
        self.write_line(&line)
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .ctx(|| format!("writing {}", self.path.display()))
    }
}

/// For writers that take any sink (stdout or a file): `flush` syncs the file to disk.
impl Write for Appender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_off_and_appending_continues() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.jsonl");
        let mut a = Appender::open(&p, true).unwrap();
        a.append(&serde_json::json!({"line": 1})).unwrap();
        a.append(&serde_json::json!({"line": 2})).unwrap();
        drop(a);
        // an interrupted third write
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"line\": 3, \"te")
            .unwrap();
        assert_eq!(complete_records(&p).unwrap().len(), 2);
        let mut a = Appender::open(&p, false).unwrap();
        a.append(&serde_json::json!({"line": 3})).unwrap();
        let lines: Vec<u64> = complete_records(&p)
            .unwrap()
            .iter()
            .map(|v| v["line"].as_u64().unwrap())
            .collect();
        assert_eq!(lines, [1, 2, 3]);
        assert!(complete_records(&d.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn torn_last_lines_are_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.jsonl");
        std::fs::write(&p, "{\"line\": 1}\n{\"line\": 2}\n{\"li").unwrap();
        assert_eq!(complete_records(&p).unwrap().len(), 2);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"line\": 1}\n{\"line\": 2}\n"
        );
    }
}
