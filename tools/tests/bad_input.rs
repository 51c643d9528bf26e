//! Every kind of bad input gets a one-line error naming the file and the
//! problem, exit code 1 from the CLI, no panic, and no output file (or
//! temporary file) left behind.

mod common;

use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURE: &str = "tiny-gqa-small";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny")
        .join(FIXTURE)
}

/// A writable copy of the fixture checkpoint (without goldens) and an empty
/// output directory, both inside a temporary directory.
struct Case {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    out_dir: PathBuf,
}

impl Case {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        let out_dir = tmp.path().join("out");
        std::fs::create_dir(&model).unwrap();
        std::fs::create_dir(&out_dir).unwrap();
        for e in std::fs::read_dir(fixture_dir()).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
            }
        }
        Self {
            _tmp: tmp,
            model,
            out_dir,
        }
    }

    fn out(&self) -> PathBuf {
        self.out_dir.join("m.nbl")
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.model.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }

    /// Rewrites model.safetensors after `f` edits its list of
    /// (name, dtype, shape, bytes).
    fn edit_tensors(&self, f: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
        let p = self.model.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut list: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        f(&mut list);
        let views: Vec<(String, TensorView)> = list
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &p).unwrap();
    }

    /// Converts with the library, expecting failure; returns the message and
    /// checks that nothing was left in the output directory.
    fn lib_error(&self) -> String {
        let err = convert(&ConvertOptions::new(
            &self.model,
            self.out(),
            QuantPolicy::Q4,
        ))
        .expect_err("conversion should fail");
        self.assert_no_output();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "one line: {msg}");
        msg
    }

    /// Converts with the CLI, expecting exit code 1 and one `error:` line.
    fn cli_error(&self) -> String {
        let out = self.out();
        let msg = run_cli(&[
            "convert",
            self.model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quant",
            "q4",
        ]);
        self.assert_no_output();
        msg
    }

    fn assert_no_output(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "files left behind: {left:?}");
    }
}

/// Runs the CLI expecting failure; returns stderr after checking its shape.
fn run_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn missing_config() {
    let c = Case::new();
    std::fs::remove_file(c.model.join("config.json")).unwrap();
    let m = c.cli_error();
    assert!(m.contains("config.json: file not found"), "{m}");
}

#[test]
fn malformed_config() {
    let c = Case::new();
    std::fs::write(c.model.join("config.json"), "{\"hidden_size\": 128,").unwrap();
    let m = c.lib_error();
    assert!(m.contains("config.json: malformed JSON"), "{m}");
}

#[test]
fn config_missing_a_key() {
    let c = Case::new();
    c.edit_config(|v| {
        v.as_object_mut().unwrap().remove("intermediate_size");
    });
    let m = c.lib_error();
    assert!(
        m.contains("config.json: missing required key 'intermediate_size'"),
        "{m}"
    );
}

#[test]
fn non_llama_architecture() {
    let c = Case::new();
    c.edit_config(|v| {
        v["model_type"] = "gpt_neox".into();
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let m = c.cli_error();
    assert!(
        m.contains("config.json: model_type 'gpt_neox' is not supported"),
        "{m}"
    );
}

#[test]
fn unsupported_dtype() {
    let c = Case::new();
    c.edit_tensors(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        let f64s: Vec<u8> =
            t.3.chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes(b.try_into().unwrap()) as f64).to_le_bytes())
                .collect();
        t.1 = Dtype::F64;
        t.3 = f64s;
    });
    let m = c.cli_error();
    assert!(
        m.contains("model.safetensors: tensor 'model.norm.weight' has dtype F64"),
        "{m}"
    );
}

#[test]
fn integer_tensor_is_rejected() {
    let c = Case::new();
    c.edit_tensors(|ts| {
        ts.push((
            "model.position_ids".into(),
            Dtype::I32,
            vec![4],
            vec![0; 16],
        ));
    });
    let m = c.lib_error();
    assert!(
        m.contains("tensor 'model.position_ids' has dtype I32"),
        "{m}"
    );
}

#[test]
fn missing_tensor() {
    let c = Case::new();
    c.edit_tensors(|ts| ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight"));
    let m = c.cli_error();
    assert!(
        m.contains("tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
        "{m}"
    );
}

#[test]
fn extra_tensor() {
    let c = Case::new();
    c.edit_tensors(|ts| {
        ts.push((
            "model.layers.0.self_attn.q_proj.bias".into(),
            Dtype::F32,
            vec![128],
            vec![0; 512],
        ))
    });
    let m = c.lib_error();
    assert!(
        m.contains("model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
        "{m}"
    );
}

#[test]
fn rotary_inv_freq_buffers_are_ignored() {
    let c = Case::new();
    c.edit_tensors(|ts| {
        ts.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            Dtype::F32,
            vec![8],
            vec![0; 32],
        ))
    });
    convert(&ConvertOptions::new(&c.model, c.out(), QuantPolicy::Q8)).unwrap();
    assert!(c.out().exists());
}

#[test]
fn mis_shaped_tensor() {
    let c = Case::new();
    c.edit_tensors(|ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        // [32, 128] stored as [128, 32]: same bytes, wrong shape.
        t.2 = vec![128, 32];
    });
    let m = c.lib_error();
    assert!(
        m.contains("tensor 'model.layers.0.self_attn.k_proj.weight' has shape [128, 32], config.json implies [32, 128]"),
        "{m}"
    );
}

#[test]
fn truncated_safetensors() {
    let c = Case::new();
    let p = c.model.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let m = c.cli_error();
    assert!(
        m.contains("model.safetensors: invalid safetensors file"),
        "{m}"
    );
    assert!(m.contains("truncated"), "{m}");
    // Shorter than the header length field itself.
    std::fs::write(&p, &bytes[..5]).unwrap();
    let m = c.lib_error();
    assert!(m.contains("truncated"), "{m}");
}

#[test]
fn corrupt_safetensors_header() {
    let c = Case::new();
    let p = c.model.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..20].copy_from_slice(b"#corruption#");
    std::fs::write(&p, &bytes).unwrap();
    let m = c.lib_error();
    assert!(
        m.contains("model.safetensors: invalid safetensors file"),
        "{m}"
    );
    assert!(m.contains("corrupt header"), "{m}");
}

#[test]
fn non_finite_weight_leaves_no_partial_output() {
    let c = Case::new();
    // lm_head is written last, so the temporary file already holds every
    // other tensor when the failure happens.
    c.edit_tensors(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == "lm_head.weight").unwrap();
        t.3[400..404].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let m = c.cli_error();
    assert!(
        m.contains("tensor 'lm_head.weight': weight 100 is NaN"),
        "{m}"
    );
}

/// A failure in the first tensor, while the reader thread is still ahead
/// with every other tensor to read: the conversion stops (no hang) with the
/// error and no output.
#[test]
fn failure_in_the_first_tensor_stops_the_reader() {
    let c = Case::new();
    c.edit_tensors(|ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap();
        t.3[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let m = c.cli_error();
    assert!(
        m.contains("tensor 'model.embed_tokens.weight': weight 0 is NaN"),
        "{m}"
    );
}

#[test]
fn failed_conversion_keeps_an_existing_output() {
    let c = Case::new();
    let out = c.out();
    std::fs::write(&out, b"previous").unwrap();
    c.edit_tensors(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == "lm_head.weight").unwrap();
        t.3[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    convert(&ConvertOptions::new(&c.model, &out, QuantPolicy::Q4)).unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    assert_eq!(std::fs::read_dir(&c.out_dir).unwrap().count(), 1);
}

#[test]
fn unwritable_output_path() {
    let c = Case::new();
    let blocker = c.out_dir.join("file.txt");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("out.nbl");
    let err = convert(&ConvertOptions::new(&c.model, &out, QuantPolicy::Q4)).unwrap_err();
    let m = err.to_string();
    assert!(
        m.starts_with(&format!("{}: cannot write the output", out.display())),
        "{m}"
    );
    let left: Vec<_> = std::fs::read_dir(&c.out_dir).unwrap().collect();
    assert_eq!(left.len(), 1, "only the blocking file remains");
    let stderr = run_cli(&[
        "convert",
        c.model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("out.nbl: cannot write the output"),
        "{stderr}"
    );
}

#[test]
fn missing_tokenizer_and_weights() {
    let c = Case::new();
    std::fs::remove_file(c.model.join("tokenizer.json")).unwrap();
    assert!(c.lib_error().contains("tokenizer.json: file not found"));
    let c = Case::new();
    std::fs::remove_file(c.model.join("model.safetensors")).unwrap();
    let m = c.lib_error();
    assert!(
        m.contains("no model.safetensors or model.safetensors.index.json"),
        "{m}"
    );
}

/// A valid converted file and its bytes.
fn converted() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ok.nbl");
    convert(&ConvertOptions::new(fixture_dir(), &out, QuantPolicy::Q4)).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    (tmp, out, bytes)
}

#[test]
fn inspect_and_verify_reject_a_truncated_nbl() {
    let (_tmp, path, bytes) = converted();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    for cmd in ["inspect", "verify"] {
        let m = run_cli(&[cmd, path.to_str().unwrap()]);
        assert!(m.contains("ok.nbl: not a valid .nbl file"), "{cmd}: {m}");
        assert!(m.contains("truncated"), "{cmd}: {m}");
    }
}

#[test]
fn verify_catches_a_flipped_bit_in_tensor_data() {
    let (_tmp, path, mut bytes) = converted();
    // Just past the page-aligned start of the data section: the first
    // tensor's quantized weights.
    bytes[4096 + 10] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let m = run_cli(&["verify", path.to_str().unwrap()]);
    assert!(
        m.contains("ok.nbl: checksum mismatch in tensor 'model.embed_tokens.weight'"),
        "{m}"
    );
    // Structure is intact, so inspect still reports the file.
    let out = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .args(["inspect", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn inspect_and_verify_reject_a_flipped_bit_in_the_directory() {
    let (_tmp, path, mut bytes) = converted();
    let n = bytes.len();
    bytes[n - 30] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    for cmd in ["inspect", "verify"] {
        let m = run_cli(&[cmd, path.to_str().unwrap()]);
        assert!(m.contains("directory checksum mismatch"), "{cmd}: {m}");
    }
}

#[test]
fn verify_accepts_a_good_file() {
    let (_tmp, path, _) = converted();
    let out = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .args(["verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("OK: "));
}

/// `--tensor-type` patterns that match no matrix (norms never count: they
/// always stay f32) are errors before anything is written.
#[test]
fn tensor_type_override_matching_no_matrix() {
    let case = Case::new();
    for pattern in ["no_such_tensor", "input_layernorm"] {
        let mut options = ConvertOptions::new(&case.model, case.out(), QuantPolicy::Q4);
        options.overrides = vec![format!("{pattern}=q8").parse().unwrap()];
        let msg = convert(&options).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("no matrix name contains '{pattern}'")),
            "{msg}"
        );
        case.assert_no_output();
    }
    let out = case.out();
    let msg = run_cli(&[
        "convert",
        case.model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--tensor-type",
        "mlp=q8",
        "--tensor-type",
        "nothing=q4k",
    ]);
    assert!(msg.contains("--tensor-type nothing=q4k"), "{msg}");
    case.assert_no_output();
}

#[test]
fn tensor_type_override_syntax() {
    use nibble_tools::convert::TypeOverride;
    let o: TypeOverride = "mlp.down_proj=q8".parse().unwrap();
    assert_eq!((o.pattern.as_str(), o.ty.name()), ("mlp.down_proj", "q8"));
    // the type follows the last '='
    let o: TypeOverride = "a=b=q4k".parse().unwrap();
    assert_eq!((o.pattern.as_str(), o.ty.name()), ("a=b", "q4k"));
    for bad in ["q8", "=q8", "mlp=q5", "mlp="] {
        assert!(bad.parse::<TypeOverride>().is_err(), "{bad}");
    }
}

// Hostile paths: device nodes, FIFOs, directories and links where files are
// expected, and outputs that are inputs (issue #20).

/// Runs the CLI with a deadline: a command blocked in `open()` of a FIFO is
/// killed and reported instead of hanging the test run.
fn run_cli_within(args: &[&str], secs: u64) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(secs) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("nibble-tools {args:?} still running after {secs} s (blocked?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Like [`run_cli`], with a deadline.
fn cli_error_within(args: &[&str]) -> String {
    let out = run_cli_within(args, 60);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn mknod_null(path: &Path) {
    let ok = Command::new("mknod")
        .arg(path)
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mknod {} (needs root)", path.display());
}

fn is_char_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .file_type()
        .is_char_device()
}

/// Every file of a directory with its bytes, sorted by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = if e.file_type().unwrap().is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn convert_refuses_a_device_node_as_output() {
    let c = Case::new();
    let dev = c.out_dir.join("x");
    mknod_null(&dev);
    let m = cli_error_within(&[
        "convert",
        c.model.to_str().unwrap(),
        "-o",
        dev.to_str().unwrap(),
    ]);
    assert!(
        m.contains("x: exists and is not a regular file (a character device)"),
        "{m}"
    );
    assert!(is_char_device(&dev), "the device node was replaced");
    // The library refuses too, down to the writer itself.
    let e = convert(&ConvertOptions::new(&c.model, &dev, QuantPolicy::Q8)).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let e = nibble::format::NblWriter::create(&dev).err().unwrap();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert!(is_char_device(&dev));
    assert_eq!(std::fs::read_dir(&c.out_dir).unwrap().count(), 1);
    // A directory is not replaced either.
    let m = cli_error_within(&[
        "convert",
        c.model.to_str().unwrap(),
        "-o",
        c.out_dir.to_str().unwrap(),
    ]);
    assert!(m.contains("(a directory)"), "{m}");
}

#[test]
fn convert_refuses_to_overwrite_its_inputs() {
    let c = Case::new();
    let before = snapshot(&c.model);
    let hard = c.out_dir.join("hard.nbl");
    std::fs::hard_link(c.model.join("model.safetensors"), &hard).unwrap();
    let soft = c.out_dir.join("soft.nbl");
    std::os::unix::fs::symlink(c.model.join("tokenizer.json"), &soft).unwrap();
    for (out, input) in [
        (c.model.join("config.json"), "config.json"),
        (c.model.join("model.safetensors"), "model.safetensors"),
        (c.model.join("tokenizer.json"), "tokenizer.json"),
        (hard.clone(), "model.safetensors"),
        (soft.clone(), "tokenizer.json"),
    ] {
        let m = cli_error_within(&[
            "convert",
            c.model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(
            m.contains(&format!(
                "is the input file {}",
                c.model.join(input).display()
            )),
            "{m}"
        );
        assert_eq!(
            snapshot(&c.model),
            before,
            "input changed by -o {}",
            out.display()
        );
    }
    // The importance file is an input too.
    let imp = c.out_dir.join("imp.safetensors");
    std::fs::write(&imp, b"not read before the check").unwrap();
    let m = cli_error_within(&[
        "convert",
        c.model.to_str().unwrap(),
        "-o",
        imp.to_str().unwrap(),
        "--imatrix",
        imp.to_str().unwrap(),
    ]);
    assert!(m.contains("is the input file"), "{m}");
    assert_eq!(std::fs::read(&imp).unwrap(), b"not read before the check");
    // A new output inside the checkpoint directory is fine.
    let inside = c.model.join("model.nbl");
    convert(&ConvertOptions::new(&c.model, &inside, QuantPolicy::Q8)).unwrap();
    // ... and so is converting again over that earlier output.
    convert(&ConvertOptions::new(&c.model, &inside, QuantPolicy::Q8)).unwrap();
}

#[test]
fn fifos_as_inputs_are_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    for args in [
        vec!["verify", fifo.to_str().unwrap()],
        vec!["inspect", fifo.to_str().unwrap()],
        vec!["inspect", "--json", fifo.to_str().unwrap()],
    ] {
        let m = cli_error_within(&args);
        assert_eq!(
            m.trim_end(),
            format!("error: {}: not a regular file (a FIFO)", fifo.display()),
            "{args:?}"
        );
    }
    // A FIFO as the importance file.
    let c = Case::new();
    let m = cli_error_within(&[
        "convert",
        c.model.to_str().unwrap(),
        "-o",
        c.out().to_str().unwrap(),
        "--imatrix",
        fifo.to_str().unwrap(),
    ]);
    assert!(m.contains("fifo: not a regular file (a FIFO)"), "{m}");
    c.assert_no_output();
    // A FIFO named like a GGUF file.
    let gguf = tmp.path().join("m.gguf");
    mkfifo(&gguf);
    let out = tmp.path().join("o.nbl");
    let m = cli_error_within(&[
        "convert",
        gguf.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(m.contains("m.gguf: not a regular file (a FIFO)"), "{m}");
    // Each file of a checkpoint.
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let c = Case::new();
        std::fs::remove_file(c.model.join(name)).unwrap();
        mkfifo(&c.model.join(name));
        let m = cli_error_within(&[
            "convert",
            c.model.to_str().unwrap(),
            "-o",
            c.out().to_str().unwrap(),
        ]);
        assert!(
            m.contains(&format!("{name}: not a regular file (a FIFO)")),
            "{m}"
        );
        c.assert_no_output();
    }
}

#[test]
fn a_directory_as_the_nbl_file_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    for cmd in ["verify", "inspect"] {
        let m = cli_error_within(&[cmd, tmp.path().to_str().unwrap()]);
        assert_eq!(
            m.trim_end(),
            format!(
                "error: {}: is a directory, not a .nbl file",
                tmp.path().display()
            )
        );
    }
}

#[test]
fn imatrix_refuses_the_model_or_the_text_as_output() {
    let (tmp, model, bytes) = converted();
    let text = tmp.path().join("calib.txt");
    // Long enough for a window of --ctx 8, so the old code got as far as
    // writing its output over the model.
    let calib = "Some calibration text, long enough for a few windows. ".repeat(4);
    std::fs::write(&text, &calib).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    for out in [&model, &text, &link] {
        let m = cli_error_within(&[
            "imatrix",
            "-m",
            model.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--ctx",
            "8",
        ]);
        assert!(m.contains("is the input file"), "{m}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), bytes);
    assert_eq!(std::fs::read_to_string(&text).unwrap(), calib);
    let dev = tmp.path().join("dev");
    mknod_null(&dev);
    let m = cli_error_within(&[
        "imatrix",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-o",
        dev.to_str().unwrap(),
        "--ctx",
        "8",
    ]);
    assert!(m.contains("not a regular file (a character device)"), "{m}");
    assert!(is_char_device(&dev));
}

#[test]
fn perturb_refuses_to_write_over_its_input() {
    let c = Case::new();
    let before = snapshot(&c.model);
    let parent = c.model.parent().unwrap().to_owned();
    let m = cli_error_within(&[
        "perturb",
        c.model.to_str().unwrap(),
        "-o",
        c.model.to_str().unwrap(),
    ]);
    assert!(m.contains("is the input"), "{m}");
    let m = cli_error_within(&[
        "perturb",
        c.model.to_str().unwrap(),
        "-o",
        parent.to_str().unwrap(),
    ]);
    assert!(m.contains("contains the input"), "{m}");
    // An output directory whose files link to the input's: fs::copy onto a
    // link to its own source used to truncate the input.
    let out = c.out_dir.join("noisy");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(c.model.join("config.json"), out.join("config.json")).unwrap();
    let m = cli_error_within(&[
        "perturb",
        c.model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(m.contains("is the input file"), "{m}");
    assert_eq!(snapshot(&c.model), before);
    // A fresh output directory works, and holds no temporaries.
    let fresh = c.out_dir.join("fresh");
    let ok = run_cli_within(
        &[
            "perturb",
            c.model.to_str().unwrap(),
            "-o",
            fresh.to_str().unwrap(),
        ],
        120,
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let names: Vec<String> = snapshot(&fresh).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    assert!(
        names.contains(&"model.safetensors".to_string()),
        "{names:?}"
    );
    assert_eq!(snapshot(&c.model), before);
}

#[test]
fn synth_refuses_a_fifo_or_a_file_where_it_writes() {
    let tmp = tempfile::tempdir().unwrap();
    // A FIFO where a file goes: writing it used to block forever.
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    mkfifo(&dir.join("config.json"));
    let m = cli_error_within(&["synth", "--preset", "tiny", "-o", dir.to_str().unwrap()]);
    assert!(
        m.contains("config.json: cannot write: exists and is not a regular file (a FIFO)"),
        "{m}"
    );
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let m = cli_error_within(&["synth", "--preset", "tiny", "-o", file.to_str().unwrap()]);
    assert!(
        m.contains("exists and is not a directory (a regular file)"),
        "{m}"
    );
}

#[test]
fn stale_temporaries_of_dead_processes_are_reclaimed() {
    let c = Case::new();
    let out = c.out();
    // A temporary of a process that no longer exists (as `kill -9` leaves
    // it), one of a live process (this test), and look-alikes that are not
    // temporaries of the target.
    let dead = c.out_dir.join(".m.nbl.tmp4194305"); // above any pid_max
    let live = c.out_dir.join(format!(".m.nbl.tmp{}", std::process::id()));
    let other = c.out_dir.join(".m.nbl.tmp12x");
    let other_target = c.out_dir.join(".n.nbl.tmp4194305");
    for p in [&dead, &live, &other, &other_target] {
        std::fs::write(p, vec![0u8; 1 << 16]).unwrap();
    }
    let ok = run_cli_within(
        &[
            "convert",
            c.model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quant",
            "q8",
        ],
        120,
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !dead.exists(),
        "the dead process's temporary is still there"
    );
    assert!(live.exists() && other.exists() && other_target.exists());
    assert!(out.exists());
}

/// A closed pipe on stdout (`| head`) ends a command quietly with status 141
/// (as a shell reports SIGPIPE); a full disk is a one-line error. Neither
/// panics ("failed printing to stdout").
#[test]
fn stdout_write_errors_never_panic() {
    let (tmp, path, _) = converted();
    let p = path.to_str().unwrap();
    let out_nbl = tmp.path().join("again.nbl");
    let fixture = fixture_dir();
    let commands: Vec<Vec<&str>> = vec![
        vec!["inspect", p],
        vec!["inspect", "--json", p],
        vec!["verify", p],
        vec![
            "convert",
            fixture.to_str().unwrap(),
            "-o",
            out_nbl.to_str().unwrap(),
            "--quant",
            "q8",
        ],
    ];
    for args in &commands {
        common::stdout_errors::assert_stdout_errors_are_clean(
            env!("CARGO_BIN_EXE_nibble-tools"),
            args,
        );
    }
}

impl Case {
    fn edit_tokenizer(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.model.join("tokenizer.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }
}

#[test]
fn absurd_layer_count_is_refused_before_planning() {
    let c = Case::new();
    c.edit_config(|v| v["num_hidden_layers"] = u32::MAX.into());
    let t = std::time::Instant::now();
    let m = c.lib_error();
    assert!(t.elapsed().as_secs() < 5, "refused up front");
    assert!(
        m.contains("config.json: 'num_hidden_layers' is 4294967295, but the checkpoint has only"),
        "{m}"
    );
    let m = c.cli_error();
    assert!(m.contains("'num_hidden_layers'"), "{m}");
}

#[test]
fn absurd_dimensions_are_refused_as_the_runtime_would() {
    for (key, value) in [
        ("hidden_size", u32::MAX as u64),
        ("vocab_size", u32::MAX as u64),
        ("num_attention_heads", 1 << 30),
    ] {
        let c = Case::new();
        c.edit_config(|v| v[key] = value.into());
        let t = std::time::Instant::now();
        let m = c.lib_error();
        assert!(t.elapsed().as_secs() < 5, "{key} refused up front");
        assert!(
            m.contains(&format!("llama.{key}' = {value} is too large")),
            "{key}: {m}"
        );
    }
}

/// What `nibble` says opening a file with these metadata, without a path.
fn runtime_message(edit: impl FnOnce(&mut nibble::format::Metadata)) -> String {
    let c = Case::new();
    let out = c.out();
    convert(&ConvertOptions::new(&c.model, &out, QuantPolicy::F32)).unwrap();
    let file = nibble::format::NblFile::open(&out).unwrap();
    let mut m = file.metadata().clone();
    edit(&mut m);
    nibble::Model::check_metadata(&m).map(|_| ()).unwrap_err()
}

#[test]
fn convert_refuses_what_the_runtime_refuses() {
    // max_position_embeddings: the runtime's limit, with the runtime's words.
    let c = Case::new();
    c.edit_config(|v| v["max_position_embeddings"] = u32::MAX.into());
    let m = c.lib_error();
    let runtime = runtime_message(|m| {
        m.set(
            nibble::format::keys::CONTEXT_LENGTH,
            nibble::format::Value::U32(u32::MAX),
        )
    });
    assert!(m.ends_with(&runtime), "{m} / {runtime}");
    assert!(m.contains("max_position_embeddings"), "{m}");

    // Merges naming tokens that are not in the vocabulary.
    let c = Case::new();
    c.edit_tokenizer(|t| {
        t["model"]["merges"][0] = serde_json::json!(["no-such-token", "x"]);
    });
    let m = c.lib_error();
    assert!(m.contains("tokenizer"), "{m}");

    // An added token past the model's vocabulary.
    let c = Case::new();
    c.edit_tokenizer(|t| {
        t["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 100000, "content": "<|beyond|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    });
    let m = c.lib_error();
    assert!(
        m.contains("tokenizer has 513 tokens but the model only 512"),
        "{m}"
    );

    // A Unigram model whose unknown token is not in its vocabulary.
    let c = Case::new();
    c.edit_tokenizer(|t| {
        t["model"] = serde_json::json!({
            "type": "Unigram", "unk_id": 7, "vocab": [["<unk>", 0.0], ["a", -1.0]]
        });
    });
    let m = c.lib_error();
    assert!(m.contains("tokenizer"), "{m}");
    assert!(c.cli_error().contains("tokenizer"));
}

#[test]
fn unknown_safetensors_dtype_names_the_tensor() {
    let c = Case::new();
    let long = "w".repeat(10_000);
    let header = serde_json::json!({
        "model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        long.clone(): {"dtype": "F99", "shape": [1], "data_offsets": [4, 8]},
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 8]);
    std::fs::write(c.model.join("model.safetensors"), bytes).unwrap();
    let m = c.cli_error();
    assert!(m.contains("model.safetensors: tensor 'www"), "{m}");
    assert!(
        m.contains("…' (10000 bytes) has unknown dtype 'F99'"),
        "{m}"
    );
    assert!(m.len() < 400, "{m}");
}
