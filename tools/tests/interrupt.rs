//! Ctrl-C during `nibble-tools convert` leaves no partial file behind, and
//! an older file at the output path as it was; a `kill -9`ed conversion's
//! temporary is reclaimed by the next conversion to the same path.

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

/// Starts converting the SmolLM2 checkpoint into `out` and returns once the
/// temporary output has data in it (so a signal lands mid-write), with the
/// temporary's path.
fn start_conversion(out: &std::path::Path) -> (std::process::Child, std::path::PathBuf) {
    // Big enough (538 MB of f32) that converting it takes seconds.
    let ckpt = common::smollm2_checkpoint();
    let child = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .arg("convert")
        .arg(&ckpt)
        .arg("-o")
        .arg(out)
        .args(["--quant", "q4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let name = out.file_name().unwrap().to_str().unwrap();
    let partial = out.with_file_name(format!(".{name}.tmp{}", child.id()));
    let t = Instant::now();
    while std::fs::metadata(&partial).map_or(true, |m| m.len() < (1 << 20)) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{} never appeared",
            partial.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    (child, partial)
}

fn interrupted_conversion_leaves_nothing(sig: &str, existing: bool) {
    if !common::have_shared() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.nbl");
    if existing {
        std::fs::write(&out, b"an older conversion").unwrap();
    }
    let (child, _) = start_conversion(&out);
    signal(child.id(), sig);
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(130), "stderr: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "want a one-line message, got: {stderr}"
    );
    // Never suggests that the older file was deleted.
    let verb = if existing {
        "was left unchanged"
    } else {
        "was not written"
    };
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: interrupted; {} {verb} (the temporary file was removed)",
            out.display()
        )
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    if existing {
        assert_eq!(left, vec!["model.nbl"], "files left behind");
        assert_eq!(std::fs::read(&out).unwrap(), b"an older conversion");
    } else {
        assert!(left.is_empty(), "files left behind: {left:?}");
    }
}

#[test]
fn sigint_removes_the_partial_output() {
    interrupted_conversion_leaves_nothing("-INT", false);
}

#[test]
fn sigterm_removes_the_partial_output() {
    interrupted_conversion_leaves_nothing("-TERM", false);
}

#[test]
fn sigint_keeps_an_existing_output() {
    interrupted_conversion_leaves_nothing("-INT", true);
}

#[test]
fn sigkilled_conversion_temporary_is_reclaimed_by_the_next_run() {
    if !common::have_shared() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.nbl");
    let (mut child, partial) = start_conversion(&out);
    signal(child.id(), "-KILL");
    child.wait().unwrap();
    assert!(partial.exists(), "SIGKILL runs no cleanup");
    // A live process's temporary (this test's) must survive.
    let live = tmp
        .path()
        .join(format!(".model.nbl.tmp{}", std::process::id()));
    std::fs::write(&live, b"in use").unwrap();
    let tiny = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tiny/tiny-gqa-small"
    );
    let ok = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .arg("convert")
        .arg(tiny)
        .arg("-o")
        .arg(&out)
        .args(["--quant", "q8"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !partial.exists(),
        "the killed run's temporary is still there"
    );
    assert_eq!(std::fs::read(&live).unwrap(), b"in use");
    assert!(out.exists());
}
