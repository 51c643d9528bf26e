//! A model file truncated under a running `nibble` (issue #20, item 12):
//! the SIGBUS of the next read is reported as one `error:` line naming the
//! file, with exit status 74, instead of a silent death by signal (135).

mod common;

use common::*;
use nibble::mapped_file_guard::EXIT_STATUS;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Forwards stderr lines to a channel, so the test can wait for one.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    rx
}

/// A copy of the tiny model in a temporary directory, and `nibble run` on it
/// generating for far longer than the test lasts, once its first output
/// arrived (the model is mapped and being read).
fn long_run(dir: &tempfile::TempDir) -> (std::path::PathBuf, Child, mpsc::Receiver<String>) {
    let path = dir.path().join("m.nbl");
    std::fs::copy(tiny_nbl("tiny-mha", "f32"), &path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .arg("run")
        .arg("-m")
        .arg(&path)
        .args(["-p", "Once upon a time", "-n", "100000", "--ignore-eos"])
        .args(["--temp", "0", "--ctx", "8192", "-t", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let errs = stderr_lines(&mut child);
    let mut seen = Vec::new();
    loop {
        match errs.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.starts_with("load: ") => break,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no load line ({e}): {seen:?}"),
        }
    }
    let mut first = [0u8; 1];
    let n = child.stdout.as_mut().unwrap().read(&mut first).unwrap();
    assert_eq!(n, 1, "stdout closed before any output");
    (path, child, errs)
}

fn finish(
    mut child: Child,
    errs: mpsc::Receiver<String>,
) -> (std::process::ExitStatus, Vec<String>) {
    // Drain stdout so the child never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let status = child.wait().unwrap();
    (status, errs.iter().collect())
}

#[test]
fn truncating_the_model_under_run_is_reported_with_status_74() {
    let dir = tempfile::tempdir().unwrap();
    let (path, child, errs) = long_run(&dir);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let (status, stderr) = finish(child, errs);
    assert_eq!(status.code(), Some(EXIT_STATUS), "{status}: {stderr:?}");
    let errors: Vec<&String> = stderr.iter().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr:?}");
    let want = format!("error: {}: the mapped file shrank", path.display());
    assert!(errors[0].starts_with(&want), "{stderr:?}");
    assert!(errors[0].contains("SIGBUS"), "{stderr:?}");
    assert!(errors[0].contains("in place"), "{stderr:?}");
}

/// A SIGBUS that is no fault in a mapped file (here sent with kill) is named
/// as such and still ends the process by the signal, as without the handler.
#[test]
fn a_sigbus_from_elsewhere_still_kills_by_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (_path, child, errs) = long_run(&dir);
    let ok = Command::new("kill")
        .args(["-BUS", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -BUS failed");
    let (status, stderr) = finish(child, errs);
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}: {stderr:?}");
    assert!(
        stderr
            .iter()
            .any(|l| l == "error: bus error (SIGBUS) outside the mapped model files"),
        "{stderr:?}"
    );
}
