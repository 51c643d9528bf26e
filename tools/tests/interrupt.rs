//! Ctrl-C during `nibble-tools convert` leaves no partial file behind.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("running kill")
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

fn interrupted_conversion_leaves_nothing(sig: &str) {
    if !common::have_shared() {
        return;
    }
    // Big enough (538 MB of f32) that converting it takes seconds, so the
    // signal lands mid-write.
    let ckpt = common::smollm2_checkpoint();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.nbl");
    let child = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .arg("convert")
        .arg(&ckpt)
        .arg("-o")
        .arg(&out)
        .args(["--quant", "q4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary output exists and has data in it, so the
    // signal arrives while the converter is writing.
    let partial = tmp.path().join(format!(".model.nbl.tmp{}", child.id()));
    let t = Instant::now();
    while std::fs::metadata(&partial).map_or(true, |m| m.len() < (1 << 20)) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{} never appeared",
            partial.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(child.id(), sig);
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(130), "stderr: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "want a one-line message, got: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "stderr: {stderr}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn sigint_removes_the_partial_output() {
    interrupted_conversion_leaves_nothing("-INT");
}

#[test]
fn sigterm_removes_the_partial_output() {
    interrupted_conversion_leaves_nothing("-TERM");
}
