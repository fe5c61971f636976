//! Helpers shared by the binary's end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

/// The built `detoxfuse` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_detoxfuse"))
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with a message containing `needle`, not a panic.
pub fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
}

/// Spawns `detoxfuse serve` as `cmd` describes (with `--port 0`) and returns the child and
/// the port it printed on its first line.
pub fn spawn_server(cmd: &mut Command) -> (Child, u16) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, port)
}

/// A small tmpfs for disk-full tests. Mounted in a private mount namespace (`unshare -rm`: an
/// unprivileged user namespace, so no root is needed) by a process that stays alive until the
/// value is dropped; the test and the binary reach it through that process's
/// `/proc/<pid>/root`. Where user namespaces are off but the test runs as root, it is mounted
/// directly (and unmounted when dropped). Writes past its size fail with ENOSPC, a real full
/// disk.
pub struct Tmpfs {
    /// The namespace's process; `None` for a direct mount.
    holder: Option<Child>,
    /// The mount point as the test sees it.
    pub root: std::path::PathBuf,
    mount_point: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let mount_point = tempfile::tempdir().unwrap();
        let dir = mount_point.path().display().to_string();
        let script =
            format!("mount -t tmpfs -o size={size} detoxfuse-test '{dir}' && echo mounted && exec sleep 3600");
        let mut holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("disk-full tests need util-linux `unshare`");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() == "mounted" {
            let root = std::path::PathBuf::from(format!("/proc/{}/root", holder.id()))
                .join(mount_point.path().strip_prefix("/").unwrap());
            return Self {
                holder: Some(holder),
                root,
                mount_point,
            };
        }
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut holder.stderr.take().unwrap(), &mut err);
        let _ = holder.wait();
        let direct = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "detoxfuse-test",
                &dir,
            ])
            .output()
            .unwrap();
        assert!(
            direct.status.success(),
            "could not mount a test tmpfs: `unshare -rm` said {:?} and `mount` said {:?}; disk-full tests need unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or root",
            err.trim(),
            String::from_utf8_lossy(&direct.stderr).trim()
        );
        Self {
            holder: None,
            root: mount_point.path().to_path_buf(),
            mount_point,
        }
    }

    /// The built binary, run where the tmpfs is at [`Tmpfs::inside`] (inside the namespace,
    /// for programs that resolve `/proc/<pid>/root` away, as pip does).
    pub fn bin(&self) -> Command {
        let Some(holder) = &self.holder else {
            return bin();
        };
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={}", holder.id()))
            .args(["--user", "--mount", "--preserve-credentials", "--"])
            .arg(env!("CARGO_BIN_EXE_detoxfuse"));
        c
    }

    /// The mount point as [`Tmpfs::bin`] sees it.
    pub fn inside(&self) -> &std::path::Path {
        self.mount_point.path()
    }

    /// Fills the file system with a ballast file until `free` bytes are left.
    pub fn fill_leaving(&self, free: u64) {
        use std::io::Write;
        let path = self.root.join(".ballast");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let block = vec![0u8; 1 << 16];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(free)).unwrap();
    }

    /// Removes the ballast: the disk has room again.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.root.join(".ballast"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        match &mut self.holder {
            Some(h) => {
                let _ = h.kill();
                let _ = h.wait();
            }
            None => {
                let _ = Command::new("umount").arg(self.mount_point.path()).status();
            }
        }
    }
}
