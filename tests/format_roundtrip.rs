use nibble::format::{keys, Metadata, NblFile, NblWriter, Value};
use nibble::quant::{encode_matrix, TensorType};

#[test]
fn writer_reader_round_trip_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.nbl");
    // a whole q4k group
    let cols = 256;
    let src: Vec<f32> = (0..3 * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let mut w = NblWriter::create(&path).unwrap();
    for ty in TensorType::ALL {
        let bytes = encode_matrix(ty, cols, &src).unwrap();
        w.add_tensor(&format!("w.{ty}"), ty, &[3, cols as u64], &bytes)
            .unwrap();
    }
    let mut meta = Metadata::new();
    meta.set(keys::ARCHITECTURE, Value::Str("llama".into()));
    w.finish(&meta).unwrap();

    let f = NblFile::open(&path).unwrap();
    f.verify_checksums().unwrap();
    assert_eq!(
        f.metadata().get_str(keys::ARCHITECTURE).unwrap(),
        Some("llama")
    );
    for ty in TensorType::ALL {
        let m = f.require(&format!("w.{ty}")).unwrap().matrix().unwrap();
        assert_eq!((m.rows(), m.cols(), m.tensor_type()), (3, cols, ty));
        let mut row = vec![0f32; cols];
        for r in 0..3 {
            m.dequantize_row(r, &mut row);
            let max_err = row
                .iter()
                .zip(&src[r * cols..])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = match ty {
                TensorType::F32 => 0.0,
                TensorType::F16 => 2e-3,
                TensorType::Q8 | TensorType::Q8R => 2.0 / 127.0,
                TensorType::Q4 => 2.0 / 8.0,
                // values in [-2, 2]: steps of at most 4/15
                TensorType::Q4K => 4.0 / 15.0,
            };
            assert!(max_err <= bound, "{ty}: {max_err} > {bound}");
        }
    }
}

#[test]
fn unfinished_writer_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.nbl");
    {
        let mut w = NblWriter::create(&path).unwrap();
        w.add_tensor("x", TensorType::F32, &[1], &[0; 4]).unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
