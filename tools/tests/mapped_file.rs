//! A source checkpoint truncated under a running `nibble-tools convert`
//! (issue #20, item 12): the SIGBUS of the next read of the mapped
//! safetensors is reported as one `error:` line naming the file, with exit
//! status 74, instead of a silent death by signal (135).
//!
//! To truncate at a known point, the test stops the conversion (SIGSTOP) as
//! soon as the safetensors shows up in its memory map, shrinks the source,
//! and lets it run into the missing pages. A conversion of the tiny fixture
//! can occasionally read every tensor before the stop lands; it then simply
//! succeeds, and the test tries again.

use nibble::mapped_file_guard::EXIT_STATUS;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/tiny-mha")
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes no pointers; the pid is our own child, not yet
    // reaped, so it cannot name another process.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

#[test]
fn truncating_the_source_under_convert_is_reported_with_status_74() {
    for attempt in 1..=10 {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for e in std::fs::read_dir(fixture()).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
            }
        }
        let source = src.join("model.safetensors");
        let out = tmp.path().join("out.nbl");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .args(["--quant", "q4k"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let maps = format!("/proc/{}/maps", child.id());
        let needle = source.to_str().unwrap().to_owned();
        let started = Instant::now();
        let mapped = loop {
            if std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(&needle)) {
                signal(child.id(), libc::SIGSTOP);
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "convert never mapped {needle}"
            );
            std::thread::sleep(Duration::from_micros(100));
        };
        if mapped {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&source)
                .unwrap()
                .set_len(4096)
                .unwrap();
            signal(child.id(), libc::SIGCONT);
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            eprintln!("attempt {attempt}: convert finished before the stop; again");
            continue;
        }
        assert_eq!(
            output.status.code(),
            Some(EXIT_STATUS),
            "{}: {stderr}",
            output.status
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        let want = format!("error: {}: the mapped file shrank", source.display());
        assert!(errors[0].starts_with(&want), "{stderr}");
        assert!(!out.exists(), "no output file is left behind");
        return;
    }
    panic!("every conversion finished before it could be stopped");
}
