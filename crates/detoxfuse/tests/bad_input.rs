//! Broken model files give errors that say what is wrong, never panics.

mod common;

use std::io::Write;

use detoxfuse::lm;
use detoxfuse::Error;

fn load_err(bytes: &[u8]) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    match lm::load(&p) {
        Ok(_) => panic!("loading a broken file succeeded"),
        Err(e) => e,
    }
}

#[test]
fn missing_model_file_names_the_fix() {
    let err = lm::load(std::path::Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap();
    assert!(matches!(err, Error::ModelNotFound { .. }));
    assert!(err.to_string().contains("detoxfuse fetch"));
}

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let full = std::fs::read(common::model("smollm2")).unwrap();
    let err = load_err(&full[..full.len() / 2]);
    assert!(matches!(err, Error::BadGguf { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    // cut inside the header as well
    let err = load_err(&full[..100_000]);
    assert!(matches!(err, Error::BadGguf { .. }), "{err}");
}

#[test]
fn random_bytes_are_not_a_gguf() {
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let err = load_err(&bytes);
    assert!(matches!(err, Error::BadGguf { .. }), "{err}");
    assert!(load_err(b"GGUF").to_string().contains("bytes long"));
}

#[test]
fn unknown_architecture_is_named() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mamba.gguf");
    let t = QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &Value::String("mamba".into()))],
        &[("x.weight", &t)],
    )
    .unwrap();
    drop(f);
    let err = lm::load(&p).err().unwrap();
    assert!(
        matches!(err, Error::UnsupportedArch { ref arch, .. } if arch == "mamba"),
        "{err}"
    );
}

/// Found by the `gguf_structured` fuzz target: candle 0.11 divides by `general.alignment`,
/// so an alignment of 0 panicked. It is refused with a message now (and a non-power of two).
#[test]
fn a_zero_or_odd_alignment_is_refused_not_a_panic() {
    use candle_core::quantized::gguf_file::{self, Value};
    let dir = tempfile::tempdir().unwrap();
    for (a, want) in [
        (0u32, "general.alignment is 0"),
        (24, "general.alignment is 24"),
    ] {
        let path = dir.path().join(format!("a{a}.gguf"));
        let arch = Value::String("llama".into());
        let align = Value::U32(a);
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &[
                ("general.architecture", &arch),
                ("general.alignment", &align),
            ],
            &[],
        )
        .unwrap();
        drop(f);
        let e = detoxfuse::gguf::GgufFile::open(&path)
            .err()
            .expect("refused");
        assert!(e.to_string().contains(want), "{e}");
    }
}
