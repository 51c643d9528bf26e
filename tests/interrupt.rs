//! Ctrl-C in `nibble run` and `nibble chat`: generation stops, the output so
//! far is kept, and the process ends (or the chat continues) cleanly.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn sigint(child: &Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("running kill")
        .success();
    assert!(ok, "kill -INT failed");
}

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

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(e) => panic!("no {needle:?} on stderr ({e}); saw {seen:?}"),
        }
    }
}

/// Reads stdout until at least one byte arrives: generation has started.
fn first_output(child: &mut Child) -> Vec<u8> {
    let out = child.stdout.as_mut().unwrap();
    let mut buf = vec![0u8; 256];
    let n = out.read(&mut buf).unwrap();
    assert!(n > 0, "stdout closed before any output");
    buf.truncate(n);
    buf
}

// SmolLM2 q4 continues this prompt greedily with digits for hundreds of
// tokens (no EOS), so only the interrupt can end the run early.
const PROMPT: &str = "The capital of France is";

#[test]
fn ctrl_c_ends_a_run_cleanly_keeping_the_partial_output() {
    if !have_shared() {
        return;
    }
    let m = smollm2_nbl("q4");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .arg("run")
        .arg("-m")
        .arg(&m)
        .args(["-p", PROMPT, "-n", "4000", "--temp", "0", "--ctx", "4096"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let errs = stderr_lines(&mut child);
    let mut text = first_output(&mut child);
    sigint(&child);
    child.stdout.take().unwrap().read_to_end(&mut text).unwrap();
    let status = child.wait().unwrap();
    let stderr: Vec<String> = errs.iter().collect();
    assert!(status.success(), "{status}: {stderr:?}");
    assert!(
        stderr.iter().any(|l| l == "stopped: interrupted"),
        "{stderr:?}"
    );
    let generated: usize = stderr
        .iter()
        .find_map(|l| l.strip_prefix("generation: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generation line: {stderr:?}"));
    assert!(
        (1..4000).contains(&generated),
        "{generated} tokens generated"
    );
    let text = String::from_utf8(text).unwrap();
    assert!(!text.trim().is_empty(), "partial output lost");
}

#[test]
fn ctrl_c_in_chat_stops_the_answer_then_ends_the_chat_at_the_prompt() {
    if !have_shared() {
        return;
    }
    let m = smollm2_nbl("q4");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .arg("chat")
        .arg("-m")
        .arg(&m)
        .args(["--temp", "0", "-n", "4000", "--ctx", "4096"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let errs = stderr_lines(&mut child);
    let mut seen = Vec::new();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "Count from 1 to 1000, one number per line.").unwrap();
    stdin.flush().unwrap();
    first_output(&mut child);
    sigint(&child);
    wait_for(&errs, "[interrupted]", &mut seen);
    // Back at the prompt (reading stdin): a second Ctrl-C ends the chat.
    std::thread::sleep(Duration::from_millis(200));
    sigint(&child);
    let status = child.wait().unwrap();
    seen.extend(errs.iter());
    assert!(status.success(), "{status}: {seen:?}");
    assert!(!seen.iter().any(|l| l.contains("panicked")), "{seen:?}");
}
