//! Files read and written by nibble and its tools, made safe against hostile
//! paths:
//!
//! - [`open_regular_for_read`] refuses a FIFO, device, socket or directory
//!   where a regular file is expected, without ever blocking in `open` (a
//!   FIFO nobody writes to would otherwise hang the reader forever).
//! - [`check_output_path`] refuses an output that exists and is not a
//!   regular file (writing "over" `/dev/null` would replace the device node)
//!   or that is, through any name or link, one of the inputs.
//! - [`AtomicFile`] writes under a temporary name beside the target,
//!   `.NAME.tmpPID`, renamed into place only when complete. Temporaries left
//!   by processes that no longer exist (killed with `SIGKILL`, or a power
//!   cut) are removed by the next [`AtomicFile::create`] of the same target;
//!   a signal handler removes this process's own with
//!   [`remove_unfinished`].
//!
//! Errors are [`std::io::Error`]s whose message is the problem alone, without
//! the path, for the caller to prefix with the file it concerns.

use std::fs::{File, FileType, Metadata};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// What a file type is, for messages: "a FIFO", "a directory", ...
pub fn describe_file_type(ft: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The error for a path that is not a regular file: "is a directory" (kind
/// `IsADirectory`) or "not a regular file (a FIFO)" (kind `InvalidInput`).
fn not_regular(ft: FileType) -> io::Error {
    if ft.is_dir() {
        io::Error::new(io::ErrorKind::IsADirectory, "is a directory")
    } else {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", describe_file_type(ft)),
        )
    }
}

/// Opens `path` for reading if it is a regular file (following symbolic
/// links). A FIFO, device, socket or directory is refused with an error of
/// kind `IsADirectory` ("is a directory") or `InvalidInput` ("not a regular
/// file (a FIFO)"); a missing file gives `NotFound`. Never blocks: the type
/// is checked before opening (so a device is never opened, which can have
/// side effects), and the file is opened non-blocking and checked again, so
/// a file swapped for a FIFO in between is refused too.
pub fn open_regular_for_read(path: &Path) -> io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK has no effect on reads of a regular file; it only keeps
        // `open` of a FIFO from waiting for a writer.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok(file)
}

/// Reads a whole regular file (see [`open_regular_for_read`]).
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open_regular_for_read(path)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes)?;
    Ok(bytes)
}

/// Whether two metadata describe the same file (device and inode).
#[cfg(unix)]
fn same_file(a: &Metadata, b: &Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &Metadata, _: &Metadata) -> bool {
    false
}

/// Checks that writing `output` (by renaming a new file over it) can neither
/// replace something that is not a regular file nor any of `inputs`:
///
/// - an existing `output` must be a regular file (after following links), so
///   a device node, FIFO or directory is never replaced;
/// - `output` must not be any input, compared by canonical path and by
///   device and inode, so symbolic and hard links to an input are refused;
/// - an input that is a directory stands for every file directly inside it.
///
/// A missing `output` is fine (even inside an input directory), as is a
/// missing input. The error message names the input, not `output`.
pub fn check_output_path(output: &Path, inputs: &[&Path]) -> io::Result<()> {
    // Nothing there, a dangling link, or a path that cannot exist (a parent
    // is a file): nothing to replace, and writing will say why it fails.
    let Ok(out_meta) = std::fs::metadata(output) else {
        return Ok(());
    };
    if !out_meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "exists and is not a regular file ({}); refusing to replace it",
                describe_file_type(out_meta.file_type())
            ),
        ));
    }
    let out_canon = std::fs::canonicalize(output).ok();
    let clash = |input: &Path| -> bool {
        let Ok(meta) = std::fs::metadata(input) else {
            return false;
        };
        same_file(&meta, &out_meta)
            || (out_canon.is_some() && std::fs::canonicalize(input).ok() == out_canon)
    };
    for &input in inputs {
        let mut candidates = vec![input.to_owned()];
        if input.is_dir() {
            if let Ok(entries) = std::fs::read_dir(input) {
                candidates.extend(entries.flatten().map(|e| e.path()));
            }
        }
        if let Some(hit) = candidates.iter().find(|c| clash(c)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "is the input file {}; refusing to overwrite an input",
                    hit.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks an output directory that files will be written into: an existing
/// `dir` must be a directory, and must not be an input directory or contain
/// one (compared by device and inode, and by canonical path). The files
/// written into it are checked one by one by [`AtomicFile::create`] and
/// [`check_output_path`].
pub fn check_output_dir(dir: &Path, inputs: &[&Path]) -> io::Result<()> {
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "exists and is not a directory ({})",
                describe_file_type(meta.file_type())
            ),
        ));
    }
    let canon = std::fs::canonicalize(dir)?;
    for &input in inputs {
        let Ok(in_meta) = std::fs::metadata(input) else {
            continue;
        };
        let in_canon = std::fs::canonicalize(input).ok();
        if same_file(&in_meta, &meta) || in_canon.as_deref() == Some(canon.as_path()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "is the input {}; refusing to write into it",
                    input.display()
                ),
            ));
        }
        if in_canon.is_some_and(|c| c.starts_with(&canon)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "contains the input {}; refusing to write into it",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// `.NAME.tmp` for `path`: the prefix of every temporary of it.
fn temp_prefix(path: &Path) -> Option<std::ffi::OsString> {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name()?);
    name.push(".tmp");
    Some(name)
}

/// Where this process writes `path` until it is complete: `.NAME.tmpPID` in
/// the same directory, so the final rename stays on one file system. `None`
/// when `path` has no file name.
pub fn temp_path(path: &Path) -> Option<PathBuf> {
    let mut name = temp_prefix(path)?;
    name.push(std::process::id().to_string());
    Some(path.with_file_name(name))
}

/// Whether process `pid` exists; `None` when this cannot be told (no
/// `/proc`), in which case nothing may be deleted on its account.
fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    Some(proc.join(pid.to_string()).exists())
}

/// Removes the temporaries of `path` (`.NAME.tmpPID` beside it) left by
/// processes that no longer exist; returns the paths removed. A temporary
/// of a live process, or of this one, is never touched, nor is anything
/// whose name is not exactly the prefix and a process id, nor anything but
/// a regular file.
///
/// (A process id is looked up in this machine's `/proc`; a temporary written
/// through a shared directory by a process in another PID namespace or on
/// another machine looks dead here. Do not write one target from several
/// machines at once.)
pub fn reclaim_stale_temps(path: &Path) -> Vec<PathBuf> {
    let Some(prefix) = temp_prefix(path) else {
        return Vec::new();
    };
    let prefix = prefix.to_string_lossy().into_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) != Some(false) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// (temporary, target) of every [`AtomicFile`] of this process not yet
/// committed or dropped.
static UNFINISHED: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

fn unfinished() -> MutexGuard<'static, Vec<(PathBuf, PathBuf)>> {
    UNFINISHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary file removed by [`remove_unfinished`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The file that was being written.
    pub target: PathBuf,
    /// Whether `target` exists: an older file, left unchanged.
    pub target_exists: bool,
}

/// For a Ctrl-C or SIGTERM handler that is about to exit the process (which
/// runs no destructors): removes the temporary file of every [`AtomicFile`]
/// still being written and reports which targets they were for.
pub fn remove_unfinished() -> Vec<Removed> {
    let mut list = unfinished();
    let mut removed = Vec::new();
    for (tmp, target) in list.drain(..) {
        if std::fs::remove_file(&tmp).is_ok() {
            removed.push(Removed {
                target_exists: std::fs::symlink_metadata(&target).is_ok(),
                target,
            });
        }
    }
    removed
}

/// A file written under [`temp_path`] and renamed over its target by
/// [`AtomicFile::commit`]; dropped uncommitted, the temporary is removed, so
/// the target is either the old file or the complete new one, never a part.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target`: refuses a `target` that exists and is not a
    /// regular file (see [`check_output_path`]), removes stale temporaries of
    /// it left by dead processes, and creates this process's temporary.
    pub fn create(target: &Path) -> io::Result<Self> {
        let tmp = temp_path(target)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
        check_output_path(target, &[])?;
        reclaim_stale_temps(target);
        let file = File::create(&tmp)?;
        unfinished().push((tmp.clone(), target.to_owned()));
        Ok(Self {
            file: Some(file),
            tmp,
            target: target.to_owned(),
        })
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The path the file will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("an AtomicFile is open until commit")
    }

    /// Flushes the data to disk and renames the file over its target.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()?;
        drop(file);
        // Under the lock, so a signal handler sees the file either before
        // the rename (and removes it) or after (and leaves the target).
        let mut list = unfinished();
        std::fs::rename(&self.tmp, &self.target)?;
        list.retain(|(t, _)| t != &self.tmp);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file().seek(pos)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        let mut list = unfinished();
        let pending = list.iter().position(|(t, _)| t == &self.tmp);
        if let Some(i) = pending {
            list.remove(i);
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temps_of_dead_processes_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.nbl");
        // PIDs above the kernel's maximum (4194304) cannot be alive.
        let dead = dir.path().join(".x.nbl.tmp999999999");
        let live = dir.path().join(format!(".x.nbl.tmp{}", std::process::id()));
        let other = dir.path().join(".x.nbl.tmp999999999x");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"t").unwrap();
        }
        let removed = reclaim_stale_temps(&target);
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && other.exists());
    }

    #[test]
    fn atomic_file_leaves_the_old_target_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::write(&target, b"old").unwrap();
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn links_to_an_input_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, b"in").unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&input, &hard).unwrap();
        let soft = dir.path().join("soft");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        for out in [&input, &hard, &soft] {
            let e = check_output_path(out, &[&input]).unwrap_err();
            assert!(e.to_string().contains("is the input file"), "{e}");
            // A directory input stands for its files.
            check_output_path(out, &[dir.path()]).unwrap_err();
        }
        check_output_path(&dir.path().join("new"), &[&input]).unwrap();
        let e = check_output_path(dir.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("(a directory)"), "{e}");
    }
}
