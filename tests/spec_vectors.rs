//! The test vectors of `format-spec/vectors/` against the reference
//! implementation: (a) regenerating them gives byte-identical files, (b) the
//! reader decodes every tensor to exactly the values in the `.txt`, (c) the
//! header, metadata and tensor table the reader reports are the ones in the
//! `.txt` (which the generator wrote from its own raw parse of the bytes).

#[allow(dead_code)]
#[path = "../examples/make_vectors.rs"]
mod make_vectors;

use make_vectors::f32_line;
use nibble::format::{FormatError, NblFile, Value};
use nibble::quant::TensorType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors")
}

fn committed_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn nbl_files() -> Vec<PathBuf> {
    let v: Vec<PathBuf> = committed_files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "nbl"))
        .collect();
    assert!(v.len() >= 6, "test vectors missing: {v:?}");
    v
}

#[test]
fn regenerating_gives_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    make_vectors::generate(tmp.path()).unwrap();
    let mut fresh: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    fresh.sort();
    let committed: Vec<String> = committed_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        fresh, committed,
        "the generator writes other files than are committed"
    );
    for name in &committed {
        let a = std::fs::read(vectors_dir().join(name)).unwrap();
        let b = std::fs::read(tmp.path().join(name)).unwrap();
        assert!(
            a == b,
            "format-spec/vectors/{name} differs from a fresh generation \
             (run `cargo run --example make_vectors` if the change is intended)"
        );
    }
}

/// The `.txt` companion split into its parts.
#[derive(Default)]
struct Txt {
    fields: BTreeMap<String, String>,
    metadata: Vec<(String, String)>,
    tensors: Vec<String>,
    decoded: BTreeMap<String, Vec<String>>,
    unusable: Vec<String>,
}

fn parse_txt(path: &Path) -> Txt {
    let text = std::fs::read_to_string(path).unwrap();
    let mut t = Txt::default();
    // Inside a multi-line block (up to the next blank line): the tensor whose
    // decoded values it lists, or None for blocks this test does not read.
    let mut block: Option<Option<String>> = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.is_empty() {
            block = None;
            continue;
        }
        if let Some(target) = &block {
            if let Some(name) = target {
                t.decoded.get_mut(name).unwrap().push(line.to_owned());
            }
            continue;
        }
        let (head, rest) = line.split_once(' ').unwrap();
        let first_word = || rest.split_once(' ').unwrap().0.to_owned();
        match head {
            "metadata" => {
                let (key, value) = rest.split_once(' ').unwrap();
                t.metadata.push((key.to_owned(), value.to_owned()));
            }
            "tensor" => t.tensors.push(rest.to_owned()),
            "decoded" => {
                t.decoded.insert(first_word(), Vec::new());
                block = Some(Some(first_word()));
            }
            "unusable" => t.unusable.push(first_word()),
            "data" | "source" | "importance" => block = Some(None),
            _ => {
                t.fields.insert(head.to_owned(), rest.to_owned());
            }
        }
    }
    t
}

/// A metadata value as the `.txt` writes it.
fn render_value(v: &Value) -> String {
    let json = |s: &str| serde_json::to_string(s).unwrap();
    match v {
        Value::U32(x) => format!("u32 {x}"),
        Value::U64(x) => format!("u64 {x}"),
        Value::F32(x) => format!("f32 {}", f32_line(*x)),
        Value::Bool(x) => format!("bool {x}"),
        Value::Str(s) => format!("str {}", json(s)),
        Value::PackedStr(s) => format!("packed str {}", json(s)),
        Value::U32Array(a) => {
            let items: Vec<String> = a.iter().map(u32::to_string).collect();
            format!("u32[] [{}]", items.join(", "))
        }
        Value::StrArray(a) => {
            let items: Vec<String> = a.iter().map(|s| json(s)).collect();
            format!("str[] [{}]", items.join(", "))
        }
    }
}

/// Decodes a tensor through the reader's views, or the reader's error.
fn reader_values(f: &NblFile, name: &str) -> Result<Vec<f32>, FormatError> {
    let view = f.require(name)?;
    if view.info.tensor_type == Some(TensorType::F32) {
        return Ok(view.f32s()?.to_vec());
    }
    let m = view.matrix()?;
    let mut out = vec![0f32; m.rows() * m.cols()];
    for (r, row) in out.chunks_exact_mut(m.cols()).enumerate() {
        m.dequantize_row(r, row);
    }
    Ok(out)
}

#[test]
fn reader_reports_what_the_txt_says() {
    for path in nbl_files() {
        let txt = parse_txt(&path.with_extension("txt"));
        let f = NblFile::open(&path).unwrap();
        let h = f.header();
        let who = path.display();

        // (c) header.
        let field = |k: &str| txt.fields.get(k).unwrap_or_else(|| panic!("{who}: no {k}"));
        assert_eq!(field("file_len"), &f.file_len().to_string(), "{who}");
        assert_eq!(
            field("header.version"),
            &format!("{}.{}", h.version_major, h.version_minor),
            "{who}"
        );
        assert_eq!(
            field("header.flags"),
            &format!("0x{:08x}", h.flags),
            "{who}"
        );
        assert_eq!(field("header.tensor_count"), &h.tensor_count.to_string());
        for (k, v) in [
            ("data_offset", h.data_offset),
            ("data_len", h.data_len),
            ("metadata_offset", h.metadata_offset),
            ("metadata_len", h.metadata_len),
            ("directory_offset", h.directory_offset),
            ("directory_len", h.directory_len),
        ] {
            assert_eq!(field(&format!("header.{k}")), &v.to_string(), "{who}: {k}");
        }
        assert_eq!(
            field("header.metadata_crc32"),
            &format!("0x{:08x}", h.metadata_crc32)
        );
        assert_eq!(
            field("header.directory_crc32"),
            &format!("0x{:08x}", h.directory_crc32)
        );
        // Re-encoding the decoded header gives the file's 80 bytes, magic,
        // reserved bytes and header checksum included.
        let bytes: String = h.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(field("header.bytes"), &bytes, "{who}");

        // (c) metadata: known types as decoded, unknown types skipped.
        assert_eq!(field("metadata.count"), &txt.metadata.len().to_string());
        let mut expected = BTreeMap::new();
        for (key, value) in &txt.metadata {
            if value.contains("(unknown, skipped)") {
                assert!(
                    f.metadata().get(key).is_none(),
                    "{who}: '{key}' not skipped"
                );
            } else {
                expected.insert(key.clone(), value.clone());
            }
        }
        let got: BTreeMap<String, String> = f
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_owned(), render_value(v)))
            .collect();
        assert_eq!(got, expected, "{who}: metadata");

        // (c) tensor table, in file order.
        let table: Vec<String> = f
            .tensors()
            .iter()
            .map(|t| {
                format!(
                    "{} {} {:?} offset {} len {} crc32 0x{:08x}",
                    t.name,
                    make_vectors::type_name(t.type_id),
                    t.shape,
                    t.offset,
                    t.len,
                    t.crc32
                )
            })
            .collect();
        assert_eq!(table, txt.tensors, "{who}: tensor table");
        f.verify_checksums().unwrap();

        // (b) decoded values, bit for bit.
        for t in f.tensors() {
            match txt.decoded.get(&t.name) {
                Some(lines) => {
                    let values = reader_values(&f, &t.name).unwrap();
                    let got: Vec<String> = values.iter().map(|&x| f32_line(x)).collect();
                    assert_eq!(&got, lines, "{who}: values of '{}'", t.name);
                    // The decimal column parses back to the same bits.
                    for line in lines {
                        let (bits, dec) = line.split_once(' ').unwrap();
                        let x: f32 = dec.parse().unwrap();
                        assert_eq!(format!("{:08x}", x.to_bits()), bits, "{who}: {line}");
                    }
                }
                None => {
                    assert!(
                        txt.unusable.contains(&t.name),
                        "{who}: '{}' undocumented",
                        t.name
                    );
                    assert!(t.tensor_type.is_none());
                    let err = reader_values(&f, &t.name).unwrap_err();
                    assert!(matches!(err, FormatError::Unsupported(_)), "{who}: {err}");
                }
            }
        }
    }
}

#[test]
fn future_vector_is_a_later_minor_version() {
    let txt = parse_txt(&vectors_dir().join("future.txt"));
    let (major, minor) = txt.fields["header.version"].split_once('.').unwrap();
    assert_eq!(major, nibble::format::VERSION_MAJOR.to_string());
    assert!(minor.parse::<u16>().unwrap() > nibble::format::VERSION_MINOR);
    assert_ne!(txt.fields["header.flags"], "0x00000000");
    assert_eq!(txt.unusable, ["future.tensor"]);
    assert!(txt.metadata.iter().any(|(_, v)| v.contains("unknown")));
}

#[test]
fn spec_worked_examples_are_current() {
    let spec =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/SPEC.md"))
            .unwrap();
    let between = |tag: &str| -> String {
        let begin = spec
            .find(&format!("<!-- {tag}:begin -->\n```text\n"))
            .unwrap_or_else(|| panic!("SPEC.md has no {tag} block"));
        let body = &spec[begin..];
        let body = &body[body.find("```text\n").unwrap() + 8..];
        body[..body.find(&format!("```\n<!-- {tag}:end -->")).unwrap()].to_owned()
    };
    assert_eq!(
        between("worked-examples"),
        make_vectors::spec_examples(),
        "SPEC.md's worked examples are stale"
    );
    assert_eq!(
        between("worked-example-q4k"),
        make_vectors::spec_example_q4k(),
        "SPEC.md's q4k worked example is stale"
    );
}

/// The weighted q4k vector exercises the weighting: its committed bytes are
/// the weighted encoder's, and the unweighted encoder would write other
/// bytes with a larger importance-weighted error.
#[test]
fn weighted_q4k_vector_is_not_the_unweighted_encoding() {
    use nibble::quant::{encode_matrix, encode_matrix_weighted, WeightView};
    let t = make_vectors::vectors()
        .into_iter()
        .flat_map(|v| v.tensors)
        .find(|t| t.name == "q4k.weighted")
        .expect("the q4k vector has a weighted tensor");
    let w = t.importance.as_deref().unwrap();
    let weighted = encode_matrix_weighted(TensorType::Q4K, 256, &t.source, Some(w)).unwrap();
    let plain = encode_matrix(TensorType::Q4K, 256, &t.source).unwrap();
    assert_ne!(weighted, plain);
    let file = NblFile::open(&vectors_dir().join("q4k.nbl")).unwrap();
    assert_eq!(reader_values(&file, "q4k.weighted").unwrap(), {
        let m = WeightView::from_bytes(TensorType::Q4K, 2, 256, &weighted).unwrap();
        let mut out = vec![0f32; 512];
        for (r, row) in out.chunks_exact_mut(256).enumerate() {
            m.dequantize_row(r, row);
        }
        out
    });
    let err = |bytes: &[u8]| {
        let m = WeightView::from_bytes(TensorType::Q4K, 2, 256, bytes).unwrap();
        let mut row = vec![0f32; 256];
        let mut e = 0f64;
        for r in 0..2 {
            m.dequantize_row(r, &mut row);
            for (j, (y, x)) in row.iter().zip(&t.source[r * 256..]).enumerate() {
                e += w[j] as f64 * ((y - x) as f64).powi(2);
            }
        }
        e
    };
    assert!(
        err(&weighted) < err(&plain),
        "{} vs {}",
        err(&weighted),
        err(&plain)
    );
}
