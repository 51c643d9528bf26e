//! The stdout rule every command of both binaries keeps (the root crate's
//! and the converter's tests include this file): a closed pipe (`| head`)
//! ends the command quietly with status 141, what a shell reports for
//! SIGPIPE; a full device (`> /dev/full`) is one `error: <stdout>: ...` line
//! and status 1; never a panic ("failed printing to stdout").

use std::process::{Command, Stdio};

/// Runs `bin args` once with a pipe whose reader is gone and once into
/// `/dev/full`, asserting the rule above.
pub fn assert_stdout_errors_are_clean(bin: &str, args: &[&str]) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
    assert!(!stderr.contains("error"), "{args:?}: {stderr}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(bin)
        .args(args)
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        ["error: <stdout>: No space left on device (os error 28)"],
        "{args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}
