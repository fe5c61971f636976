//! The vendored data (`data/`, embedded in the library) installs into an empty directory as
//! exactly the files of the development data set (`../shared/data`) that the product reads:
//! every RTP, HH-RLHF and rebuilt ToxiGen file byte for byte.

use std::path::PathBuf;

#[test]
fn installed_vendored_data_equals_the_shared_data_set_byte_for_byte() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let dir = tempfile::tempdir().unwrap();
    let d = detoxfuse::hub::install_data(&dir.path().join("data")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_object().unwrap();
    assert_eq!(
        files.len(),
        2 + 1 + 31,
        "2 RTP, 1 HH-RLHF, 31 ToxiGen files"
    );
    for name in files.keys() {
        let got = std::fs::read(d.join(name)).unwrap();
        let want = std::fs::read(shared.join(name)).unwrap();
        assert!(got == want, "{name} differs from ../shared/data/{name}");
    }
    // What is embedded stays small (the brief: a few MB in all).
    let bytes: usize = detoxfuse::hub::vendored_files()
        .iter()
        .map(|(_, b)| b.len())
        .sum();
    assert!(bytes < 4_000_000, "{bytes} bytes embedded");
}
