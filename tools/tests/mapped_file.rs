//! A source checkpoint truncated under a running `nibble-tools convert`
//! (issue #20, item 12): the SIGBUS of the next read of the mapped
//! safetensors is reported as one `error:` line naming the file, with exit
//! status 74, instead of a silent death by signal (135).
//!
//! To truncate at a known point, the importance file is a FIFO: `convert`
//! reads it after mapping the safetensors and before reading any tensor, so
//! once it has opened the FIFO the test shrinks the source, then feeds the
//! importances and lets the conversion run into the missing pages.

use nibble::mapped_file_guard::EXIT_STATUS;
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/tiny-mha")
}

#[test]
fn truncating_the_source_under_convert_is_reported_with_status_74() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
        }
    }
    // Importances of the tiny model, to be fed through the FIFO.
    let f32_path = tmp.path().join("f32.nbl");
    convert(&ConvertOptions::new(&src, &f32_path, QuantPolicy::F32)).unwrap();
    let text = tmp.path().join("cal.txt");
    std::fs::write(&text, "The river ran quietly past the mill. ".repeat(20)).unwrap();
    let imat = tmp.path().join("tiny.imatrix");
    nibble_tools::imatrix::collect(&f32_path, &text, 64, &imat, false).unwrap();
    let importances = std::fs::read(&imat).unwrap();
    let fifo = tmp.path().join("fifo.imatrix");
    let ok = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo failed");

    let out = tmp.path().join("out.nbl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .args(["--quant", "q4k", "--imatrix"])
        .arg(&fifo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A non-blocking open for writing fails (ENXIO) until a reader has the
    // FIFO open: then `convert` has mapped the source and waits for data.
    let started = Instant::now();
    let mut writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if let Some(status) = child.try_wait().unwrap() {
                    let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
                    panic!("convert ended before reading the importances: {status}: {err}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "convert never opened the FIFO"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("opening the FIFO: {e}"),
        }
    };
    let source = src.join("model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut rest = &importances[..];
    while !rest.is_empty() {
        match writer.write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("writing the FIFO: {e}"),
        }
    }
    drop(writer);

    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
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
}
