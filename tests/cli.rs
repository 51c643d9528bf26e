//! The `nibble` binary end to end: output formats and clean one-line errors
//! on bad input (never a panic).

mod common;

use common::*;
use std::process::{Command, Output};

fn nibble(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(args)
        .output()
        .expect("run nibble")
}

/// Asserts failure with exactly one `error: ...` line containing `needle`.
fn assert_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert!(errors[0].contains(needle), "{needle:?} not in {stderr}");
}

fn tiny() -> String {
    tiny_nbl("tiny-mha", "f32").to_str().unwrap().to_owned()
}

#[test]
fn run_json_is_greedy_and_reproducible() {
    let m = tiny();
    let text = "It is a truth universally acknowledged";
    let out = nibble(&[
        "run", "-m", &m, "-p", text, "-n", "16", "--temp", "0", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let prompt = ids(&j["prompt_tokens"]);
    assert_eq!(prompt[0], 1, "BOS added once");
    assert_ne!(prompt[1], 1);
    assert!(j["text"].is_string());
    let keys: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 3);
    let tokens = ids(&j["tokens"]);
    assert!(!tokens.is_empty() && tokens.len() <= 16);
    // The same greedy run through the library gives the same tokens.
    let model = nibble::Model::open(&m).unwrap();
    let mut s = nibble::Session::new(&model, Default::default()).unwrap();
    let mut sampler = nibble::Sampler::new(nibble::SamplerOptions::greedy()).unwrap();
    let opts = nibble::GenerateOptions {
        max_tokens: 16,
        ..Default::default()
    };
    let lib: Vec<u32> = nibble::generate(&mut s, &prompt, &mut sampler, opts)
        .unwrap()
        .filter_map(|p| p.unwrap().token)
        .collect();
    assert_eq!(tokens, lib);
    // Sampling with a seed is reproducible.
    let args = [
        "run", "-m", &m, "-p", "It is", "-n", "12", "--temp", "1.0", "--seed", "7", "--json",
    ];
    assert_eq!(nibble(&args).stdout, nibble(&args).stdout);
}

#[test]
fn stats_go_to_stderr() {
    let out = nibble(&[
        "run",
        "-m",
        &tiny(),
        "-p",
        "It is",
        "-n",
        "4",
        "--temp",
        "0",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in ["load:", "prompt:", "generation:", "tok/s", "peak RSS:"] {
        assert!(stderr.contains(want), "{want} missing: {stderr}");
    }
}

#[test]
fn prompt_longer_than_context() {
    let long = "word ".repeat(400);
    let out = nibble(&["run", "-m", &tiny(), "-p", &long, "--ctx", "64"]);
    assert_error(&out, "context");
}

#[test]
fn empty_prompt() {
    assert_error(&nibble(&["run", "-m", &tiny(), "-p", ""]), "empty");
}

#[test]
fn missing_model_file() {
    let out = nibble(&["run", "-m", "/nonexistent/model.nbl", "-p", "hi"]);
    assert_error(&out, "/nonexistent/model.nbl");
}

#[test]
fn corrupt_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.nbl");
    let mut bytes = std::fs::read(tiny()).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, &bytes).unwrap();
    let out = nibble(&["run", "-m", bad.to_str().unwrap(), "-p", "hi"]);
    assert_error(&out, "bad.nbl");
    std::fs::write(&bad, b"not a model at all").unwrap();
    let out = nibble(&["run", "-m", bad.to_str().unwrap(), "-p", "hi"]);
    assert_error(&out, "bad.nbl");
}

#[test]
fn invalid_utf8_prompt_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prompt.txt");
    std::fs::write(&f, b"caf\xe9\n").unwrap();
    let out = nibble(&["run", "-m", &tiny(), "-f", f.to_str().unwrap()]);
    assert_error(&out, "not valid UTF-8");
}

#[test]
fn bad_sampling_option() {
    assert_error(
        &nibble(&["run", "-m", &tiny(), "-p", "hi", "--top-p", "0"]),
        "--top-p",
    );
}

#[test]
fn perplexity_json_counts_windows() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("text.txt");
    let text = std::fs::read_to_string(fixtures().join("eval-text.txt")).unwrap();
    std::fs::write(&f, &text[..3000]).unwrap();
    let out = nibble(&[
        "perplexity",
        "-m",
        &tiny(),
        "-f",
        f.to_str().unwrap(),
        "--ctx",
        "128",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chunks = j["chunks"].as_u64().unwrap();
    assert!(chunks >= 2);
    assert_eq!(j["tokens_scored"].as_u64().unwrap(), chunks * 63);
    let ppl = j["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0);
}

#[test]
fn chat_from_piped_stdin() {
    use std::io::Write;
    // The tiny model has no chat template: a clean error.
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["chat", "-m", &tiny(), "--temp", "0", "-n", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_error(&out, "chat template");
}

#[test]
fn bench_json_fields() {
    let out = nibble(&[
        "bench",
        "-m",
        &tiny(),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "-d",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["pp_tps", "tg_tps", "load_s", "peak_rss_bytes"] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}: {j}");
    }
    assert_eq!(j["depth"], 8);
    assert!(j["kernels"].is_string());
}

/// tiny-mha's greedy continuation of its 33-token golden prompt reaches EOS
/// (id 2) at the third step: `run` stops there, and with `--ignore-eos`
/// generates all `-n` tokens.
#[test]
fn ignore_eos_generates_every_token() {
    let m = tiny();
    let golden = read_json(&fixtures().join("tiny/tiny-mha/golden/golden.json"));
    let prompt = ids(&golden["prompts"]["len33"]["ids"]);
    let model = nibble::Model::open(&m).unwrap();
    let text = model.tokenizer().decode(&prompt[1..]).unwrap();
    assert_eq!(model.tokenizer().encode(&text, true).unwrap(), prompt);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run", "-m", &m, "-p", &text, "-n", "8", "--temp", "0", "--json",
        ];
        args.extend_from_slice(extra);
        let out = nibble(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids(&j["tokens"])
    };
    let stopped = run(&[]);
    assert!(
        stopped.len() < 8 && stopped.last() == Some(&2),
        "{stopped:?}"
    );
    let all = run(&["--ignore-eos"]);
    assert_eq!(all.len(), 8, "{all:?}");
    assert_eq!(all[..stopped.len()], stopped[..]);
}

/// Runs nibble with a deadline, so a command blocked in `open()` of a FIFO
/// fails the test instead of hanging it.
fn nibble_within(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nibble");
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(secs) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("nibble {args:?} still running after {secs} s (blocked?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn fifo_or_directory_as_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let ok = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let f = fifo.to_str().unwrap();
    for args in [
        vec!["run", "-m", f, "-p", "hi"],
        vec!["bench", "-m", f, "-p", "8", "-n", "4"],
    ] {
        let out = nibble_within(&args, 60);
        assert_error(&out, &format!("{f}: not a regular file (a FIFO)"));
    }
    let d = dir.path().to_str().unwrap();
    let out = nibble_within(&["run", "-m", d, "-p", "hi"], 60);
    assert_error(&out, &format!("{d}: is a directory, not a .nbl file"));
}

/// Every subcommand that prints to stdout: a closed pipe (`| head`) ends it
/// quietly with status 141 (what a shell reports for SIGPIPE), /dev/full
/// with a one-line error; never a panic ("failed printing to stdout").
#[test]
fn stdout_write_errors_never_panic() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man. ".repeat(8),
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["run", "-m", &m, "-p", "Once", "-n", "4", "--temp", "0"],
        vec![
            "run", "-m", &m, "-p", "Once", "-n", "4", "--temp", "0", "--json",
        ],
        vec!["perplexity", "-m", &m, "-f", t, "--ctx", "32"],
        vec!["perplexity", "-m", &m, "-f", t, "--ctx", "32", "--json"],
        vec![
            "perplexity",
            "-m",
            &m,
            "-f",
            t,
            "--ctx",
            "32",
            "--kl-base",
            &m,
        ],
        vec!["bench", "-m", &m, "-p", "8", "-n", "4", "-r", "1"],
        vec!["bench", "-m", &m, "-p", "8", "-n", "4", "-r", "1", "--json"],
    ];
    for args in &commands {
        stdout_errors::assert_stdout_errors_are_clean(env!("CARGO_BIN_EXE_nibble"), args);
    }
}

/// A copy of the tiny-mha checkpoint with `edit` applied to its config.json,
/// converted to f32 in `dir`.
fn tiny_with_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let src = fixtures().join("tiny/tiny-mha");
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), ckpt.join(f)).unwrap();
    }
    let mut config = read_json(&src.join("config.json"));
    edit(&mut config);
    std::fs::write(ckpt.join("config.json"), config.to_string()).unwrap();
    let out = dir.join("m.nbl");
    let opts = nibble_tools::convert::ConvertOptions::new(
        &ckpt,
        &out,
        nibble_tools::convert::QuantPolicy::F32,
    );
    nibble_tools::convert::convert(&opts).unwrap();
    out.to_str().unwrap().to_owned()
}

#[test]
fn context_beyond_memory_is_refused_up_front() {
    let m = tiny();
    let t = std::time::Instant::now();
    let out = nibble(&["run", "-m", &m, "-p", "hi", "--ctx", "1000000000"]);
    assert_error(&out, "needs");
    assert_error(&out, "available (lower --ctx)");
    assert_eq!(out.status.code(), Some(1), "an error, not an abort");
    assert!(t.elapsed().as_secs() < 5, "refused before allocating");
    for args in [
        &[
            "bench",
            "-m",
            &m,
            "-d",
            "100000000000",
            "-r",
            "1",
            "-p",
            "0",
        ][..],
        &[
            "perplexity",
            "-m",
            &m,
            "-f",
            "/dev/null",
            "--ctx",
            "1000000000000",
        ][..],
    ] {
        let out = nibble(args);
        assert!(!out.status.success());
        assert!(!String::from_utf8_lossy(&out.stderr).contains("memory allocation"));
    }
    assert_error(
        &nibble(&[
            "bench",
            "-m",
            &m,
            "-d",
            "100000000000",
            "-r",
            "1",
            "-p",
            "0",
        ]),
        "(lower -p, -n or -d)",
    );
    // The server refuses at startup, before binding.
    assert_error(
        &nibble(&["serve", "-m", &m, "--port", "0", "--ctx", "1000000000"]),
        "available (lower --ctx)",
    );
    // A modest context within a small explicit limit.
    let out = nibble(&[
        "run",
        "-m",
        &m,
        "-p",
        "hi",
        "--ctx",
        "200",
        "--max-memory",
        "1M",
    ]);
    assert_error(
        &out,
        "the memory limit allows 1.0 MiB (lower --ctx or raise --max-memory)",
    );
    assert_error(
        &nibble(&["run", "-m", &m, "-p", "hi", "--max-memory", "lots"]),
        "not a size",
    );
    let out = nibble(&[
        "run",
        "-m",
        &m,
        "-p",
        "hi",
        "-n",
        "2",
        "--ctx",
        "200",
        "--max-memory",
        "64M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn huge_model_context_is_capped_to_fit() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_with_config(dir.path(), |c| {
        c["max_position_embeddings"] = 4_000_000.into()
    });
    let out = nibble(&[
        "run",
        "-m",
        &m,
        "-p",
        "hi",
        "-n",
        "4",
        "--max-memory",
        "32M",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let note = stderr
        .lines()
        .find(|l| l.starts_with("note: "))
        .expect(&stderr);
    assert!(
        note.contains("context of 4000000 tokens does not fit in 32.0 MiB"),
        "{note}"
    );
    // The library tells the same story: the capped context fits the limit.
    let model = nibble::Model::open(&m).unwrap();
    let opts = nibble::SessionOptions {
        max_memory: Some(32 << 20),
        ..Default::default()
    };
    let s = nibble::Session::new(&model, opts).unwrap();
    assert_eq!(s.plan().capped_from, Some(4_000_000));
    assert!(s.ctx() >= 256 && s.plan().memory.total <= 32 << 20);
    // An explicit --ctx is never shortened.
    let out = nibble(&[
        "run",
        "-m",
        &m,
        "-p",
        "hi",
        "--ctx",
        "4000000",
        "--max-memory",
        "32M",
    ]);
    assert_error(&out, "a context of 4000000 tokens needs");
    // Without a limit the default run works (it fits what this machine
    // has, or is capped to it).
    let out = nibble(&["run", "-m", &m, "-p", "hi", "-n", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tiny model rewritten with `edit` applied to its metadata.
fn tiny_with_metadata(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut nibble::format::Metadata),
) -> String {
    let out = dir.join("edited.nbl");
    rewrite_metadata(std::path::Path::new(&tiny()), &out, edit);
    out.to_str().unwrap().to_owned()
}

#[test]
fn errors_quote_values_briefly() {
    use nibble::format::{keys, Value};
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_with_metadata(dir.path(), |m| {
        m.set(keys::HIDDEN_SIZE, Value::Str("9".repeat(1 << 20)))
    });
    let out = nibble(&["run", "-m", &m, "-p", "hi"]);
    assert_error(&out, "edited.nbl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(line.len() < 400, "{} bytes: {}", line.len(), &line[..400]);
    assert!(line.contains("'llama.hidden_size'"), "{line}");
    assert!(line.contains("…' (1048576 bytes)"), "{line}");
    let m = tiny_with_metadata(dir.path(), |m| {
        m.set(keys::ARCHITECTURE, Value::Str("x\n".repeat(1 << 19)))
    });
    let out = nibble(&["run", "-m", &m, "-p", "hi"]);
    assert_error(&out, "architecture 'x\\nx\\n");
    assert!(out.stderr.len() < 1000);
}

#[test]
fn packed_strings_are_capped_and_inflated_only_when_read() {
    use nibble::format::{keys, Value};
    let dir = tempfile::tempdir().unwrap();
    // 40 MiB of text under a key the runtime never reads: not inflated, so
    // the run's peak memory stays that of the tiny model.
    let m = tiny_with_metadata(dir.path(), |m| {
        m.set("x.unread", Value::PackedStr(" ".repeat(40 << 20)))
    });
    let out = nibble(&["run", "-m", &m, "-p", "hi", "-n", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let peak: f64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS: "))
        .and_then(|l| l.split(' ').next())
        .expect(&stderr)
        .parse()
        .unwrap();
    assert!(
        peak < 30.0,
        "peak RSS {peak} MiB: the unread string was inflated"
    );
    // Two such strings pass the limit of all packed strings of a file.
    let m = tiny_with_metadata(dir.path(), |m| {
        m.set("x.a", Value::PackedStr(" ".repeat(40 << 20)));
        m.set(keys::CHAT_TEMPLATE, Value::PackedStr(" ".repeat(40 << 20)));
    });
    assert_error(&nibble(&["run", "-m", &m, "-p", "hi"]), "limit of one file");
}

#[test]
fn perplexity_and_chat_check_the_context_against_memory() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "It is a truth universally acknowledged. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    let out = nibble(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        t,
        "--ctx",
        "64",
        "--max-memory",
        "1M",
    ]);
    assert_error(&out, "a context of 64 tokens needs");
    let out = nibble(&["chat", "-m", &m, "--ctx", "1000000000"]);
    assert_error(&out, "available (lower --ctx)");
}
