//! The one way files are written: into a temporary file beside the destination, synced to
//! disk, then renamed over it, so that a reader (or a run resumed after a crash or a full
//! disk) finds the old file or the new one, never a part.

use std::path::Path;

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{Error, IoContext, Result};

/// Writes `path` by letting `fill` write a temporary path in the same directory, then syncs
/// and renames it into place. Creates the parent directory. On any error the temporary
/// file is removed and `path` is untouched.
pub fn write_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = prepare(path, fill)?;
    persist(tmp, path)
}

/// Writes a set of files that belong together (a map and its manifest): every temporary file
/// is filled and synced before the first rename, so a full disk or any other write error
/// leaves all the old files in place, never a new one beside an old one.
pub fn write_together(files: Vec<(&Path, Fill<'_>)>) -> Result<()> {
    let mut ready = Vec::with_capacity(files.len());
    for (path, fill) in files {
        ready.push((prepare(path, fill)?, path));
    }
    for (tmp, path) in ready {
        persist(tmp, path)?;
    }
    Ok(())
}

/// What fills one temporary file of [`write_together`].
pub type Fill<'a> = Box<dyn FnOnce(&Path) -> Result<()> + 'a>;

/// A filled, synced temporary file beside `path`, removed again if it is dropped unpersisted.
fn prepare(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<tempfile::TempPath> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(parent)
        .ctx(|| format!("creating a temporary file in {}", parent.display()))?
        .into_temp_path();
    fill(&tmp)?;
    // A temporary file is created private (0600); the result gets the old file's mode, or
    // the usual 0644 of a new one.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions())
            .unwrap_or_else(|_| std::fs::Permissions::from_mode(0o644));
        std::fs::set_permissions(&tmp, mode)
            .ctx(|| format!("setting the mode of {}", tmp.display()))?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", tmp.display()))?;
    Ok(tmp)
}

fn persist(tmp: tempfile::TempPath, path: &Path) -> Result<()> {
    tmp.persist(path)
        .map_err(|e| e.error)
        .ctx(|| format!("renaming into {}", path.display()))
}

/// Writes `tensors` as a safetensors file at `path` ([`write_with`]). A failed write (a
/// full disk) is reported as the I/O error it is, naming the file, not as a tensor error.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_with(path, |tmp| save_safetensors(tensors, tmp))
}

/// `candle_core::safetensors::save` with its I/O errors kept as I/O errors.
pub(crate) fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    use candle_core::Error as C;
    candle_core::safetensors::save(tensors, path).map_err(|e| match e {
        C::Io(source) | C::SafeTensor(safetensors::SafeTensorError::IoError(source)) => Error::Io {
            context: format!("writing {}", path.display()),
            source,
        },
        other => other.into(),
    })?;
    // safetensors creates the file private (0600); a model is for others to read too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .ctx(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// Moves a finished temporary file or directory `from` (written in `to`'s file system) to
/// `to`: a file is synced first; a directory already at `to` is removed first (a reader may
/// then find nothing, never a part). The one rename of the library besides [`write_with`]'s.
pub fn move_into_place(from: &Path, to: &Path) -> Result<()> {
    if from.is_file() {
        std::fs::File::open(from)
            .and_then(|f| f.sync_all())
            .ctx(|| format!("syncing {}", from.display()))?;
    } else if to.is_dir() {
        std::fs::remove_dir_all(to).ctx(|| format!("replacing {}", to.display()))?;
    }
    std::fs::rename(from, to).ctx(|| format!("moving {} into place", to.display()))
}

/// [`write_with`] for bytes already in memory.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        std::fs::write(tmp, bytes).ctx(|| format!("writing {}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.json");
        write(&p, b"old").unwrap();
        let err = write_with(&p, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(crate::Error::Input("disk full".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let left: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "a temporary file was left behind");
        write(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{mode:o}");
        }
    }
}
