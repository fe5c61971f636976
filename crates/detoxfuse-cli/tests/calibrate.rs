//! `detoxfuse calibrate` end to end on the real SmolLM2 base (1 layer, small batches so a run
//! takes seconds): a run killed with SIGKILL and resumed logs exactly the losses of an
//! uninterrupted run, so does a run stopped by a full disk, an alignment that finds the disk
//! full leaves the old one, and bad input ends in a message, never a panic or a checkpoint
//! that looks complete.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{assert_clean_failure, bin, run, stderr, Tmpfs};
use std::time::{Duration, Instant};

/// A small clean corpus (the test's own sentences; never evaluation data).
/// A temporary directory holding the test corpus (`corpus.jsonl`), and the corpus's path.
fn dir_with_corpus() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    write_corpus(&corpus);
    (dir, corpus)
}

fn write_corpus(path: &Path) {
    let subjects = [
        "The river",
        "A lighthouse",
        "Our garden",
        "The old library",
        "A small boat",
        "The morning train",
    ];
    let verbs = [
        "carries",
        "shelters",
        "welcomes",
        "remembers",
        "follows",
        "brightens",
    ];
    let objects = [
        "the quiet travellers",
        "every curious child",
        "the autumn leaves",
        "a patient reader",
        "the distant hills",
    ];
    let mut lines = String::new();
    for (i, s) in subjects.iter().enumerate() {
        for (j, v) in verbs.iter().enumerate() {
            let o = objects[(i + j) % objects.len()];
            lines.push_str(&serde_json::json!({"text": format!("{s} {v} {o}, and the day goes on calmly as it always has."), "source": "test"}).to_string());
            lines.push('\n');
        }
    }
    lines.push_str(&serde_json::json!({"prompt": "Question: what grows in spring?\nAnswer:", "completion": " Flowers, grass and young leaves.", "source": "test"}).to_string());
    lines.push('\n');
    std::fs::write(path, lines).unwrap();
}

const STEPS: &str = "14";

/// The flags both recipes' resume tests share: one layer, [`STEPS`] steps into `out`,
/// checkpoints and validation often, one seed, quiet.
fn run_flags(out: &str) -> [&str; 13] {
    [
        "--out",
        out,
        "--layers",
        "1",
        "--steps",
        STEPS,
        "--checkpoint-every",
        "2",
        "--eval-every",
        "5",
        "--seed",
        "3",
        "--quiet",
    ]
}

fn train_args<'a>(corpus: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "calibrate",
        // Not the default recipe: the tiny corpus is too small for a lens fit.
        "--head-init",
        "tied",
        "--unlikelihood",
        "0",
        "--corpus",
        corpus,
        "--batch-tokens",
        "96",
        "--warmup",
        "3",
        "--lr",
        "1e-3",
    ];
    args.extend(run_flags(out));
    args
}

/// (step, is validation, loss) for each line of a run's log (timings dropped).
fn losses(out: &Path) -> Vec<(u64, bool, String)> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let val = v.get("val_loss").is_some();
            let loss = v
                .get("loss")
                .or_else(|| v.get("val_loss"))
                .unwrap()
                .to_string();
            (v["step"].as_u64().unwrap(), val, loss)
        })
        .collect()
}

fn checkpoint_step(out: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(out.join("checkpoint.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

/// Each log line without its timing: every loss, validation figure and token count.
fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// Trains to the end into `a`, then again into `b` killed with SIGKILL at its first
/// checkpoint and resumed; returns the uninterrupted run's losses after checking that the
/// resumed run logged exactly the same lines.
fn kill_9_then_resume(args: impl Fn(&str) -> Vec<String>, dir: &Path) -> Vec<(u64, bool, String)> {
    kill_9_then_resume_until(args, dir, &["model/config.json", "model/model.safetensors"]);
    losses(&dir.join("a"))
}

/// [`kill_9_then_resume`] for a run whose finished result is the files `done` (relative to
/// the run directory), which the interrupted run must not have written.
fn kill_9_then_resume_until(args: impl Fn(&str) -> Vec<String>, dir: &Path, done: &[&str]) {
    let run_s = |v: &[String]| run(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let a = dir.join("a");
    let o = run_s(&args(a.to_str().unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = log_lines(&a);
    assert!(reference.len() >= 14, "{reference:?}");

    let b = dir.join("b");
    let mut child = bin()
        .args(args(b.to_str().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let killed_at = loop {
        if let Some(s) = checkpoint_step(&b) {
            child.kill().unwrap(); // SIGKILL
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );
    assert!(killed_at < 14, "killed at step {killed_at}");
    for f in done {
        assert!(!b.join(f).exists(), "an interrupted run must not leave {f}");
    }

    let mut resume = args(b.to_str().unwrap());
    resume.push("--resume".into());
    let o = run_s(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        log_lines(&b),
        log_lines(&a),
        "resumed from step {killed_at}"
    );
    for f in done {
        assert!(b.join(f).exists(), "the resumed run wrote no {f}");
    }
}

#[test]
fn kill_9_then_resume_repeats_the_uninterrupted_losses() {
    let (dir, corpus) = dir_with_corpus();
    let c = corpus.to_str().unwrap();
    let args = |out: &str| train_args(c, out).into_iter().map(String::from).collect();
    let reference = kill_9_then_resume(args, dir.path());

    // Validation loss went down on this corpus.
    let val: Vec<f64> = reference
        .iter()
        .filter(|(_, val, _)| *val)
        .map(|(_, _, l)| l.parse().unwrap())
        .collect();
    assert!(val.len() >= 2);
    let (first, last) = (val[0], val[val.len() - 1]);
    assert!(last < first, "validation loss {first} -> {last}");
}

/// The same with a tuned-lens head and an unlikelihood term: the lens file and the second
/// data stream's position must come back from the checkpoint too.
#[test]
fn kill_9_then_resume_with_lens_head_and_unlikelihood() {
    let (dir, corpus) = dir_with_corpus();
    // The test's own stand-ins for text to avoid (rude remarks about the corpus's subjects).
    let unlikely = dir.path().join("unlikely.jsonl");
    let mut lines = String::new();
    for (i, s) in ["river", "lighthouse", "garden", "library", "boat", "train"]
        .iter()
        .enumerate()
    {
        let rec = serde_json::json!({
            "prompt": format!("- the {s} is dull\n- the {s} is ugly\n-"),
            "completion": format!(" the {s} is worthless and stupid number {i}"),
        });
        lines.push_str(&format!("{rec}\n"));
    }
    std::fs::write(&unlikely, lines).unwrap();
    let (c, u) = (corpus.to_str().unwrap(), unlikely.to_str().unwrap());
    let args = |out: &str| {
        let mut v: Vec<String> = train_args(c, out).into_iter().map(String::from).collect();
        v.extend(
            [
                "--head-init",
                "lens",
                "--lens-texts",
                "40",
                "--unlikelihood",
                "2",
                "--unlikely-corpus",
                u,
                "--unlikely-batch-tokens",
                "64",
            ]
            .map(String::from),
        );
        v
    };
    kill_9_then_resume(args, dir.path());
    let log = log_lines(&dir.path().join("a"));
    let steps_with_term = log
        .iter()
        .filter(|v| v.get("unlikelihood").is_some())
        .count();
    assert_eq!(steps_with_term, 14, "{log:?}");
}

#[test]
fn bad_input_is_a_message_and_leaves_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let r = run(&train_args(empty.to_str().unwrap(), o));
    assert_clean_failure(&r, "has no records");

    let binary = dir.path().join("latin1.jsonl");
    std::fs::write(
        &binary,
        b"{\"text\": \"fine line\"}\n{\"text\": \"caf\xe9\"}\n",
    )
    .unwrap();
    let r = run(&train_args(binary.to_str().unwrap(), o));
    assert_clean_failure(&r, "latin1.jsonl:2: not valid UTF-8");

    let corpus = dir.path().join("corpus.jsonl");
    write_corpus(&corpus);
    let c = corpus.to_str().unwrap();

    // A base model that is not llama-family.
    let mut args = train_args(c, o);
    args.extend(["--base", "gemma3"]);
    assert_clean_failure(&run(&args), "gemma3");

    // An output directory that cannot be created (its parent is a file).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let bad_out = file.join("out");
    let r = run(&train_args(c, bad_out.to_str().unwrap()));
    assert_clean_failure(&r, "choose a writable --out");

    // Resuming with other options than the checkpoint's.
    let mut first = train_args(c, o);
    first.extend(["--steps", "2"]);
    let r = run(&first);
    assert!(r.status.success(), "{}", stderr(&r));
    let mut other = first.clone();
    other.extend(["--lr", "5e-4", "--resume"]);
    assert_clean_failure(&run(&other), "training options differ");
    // Starting over into a directory with a run needs --resume or another --out.
    assert_clean_failure(&run(&train_args(c, o)), "pass --resume");

    assert!(!bad_out.exists());
}

#[test]
fn lens_head_starts_as_a_language_model_and_is_exported_beside_the_model() {
    let (dir, corpus) = dir_with_corpus();
    let c = corpus.to_str().unwrap();
    let initial_val = |out: &Path| -> f64 {
        losses(out)
            .into_iter()
            .find(|(step, val, _)| *step == 0 && *val)
            .unwrap()
            .2
            .parse()
            .unwrap()
    };
    let short = |args: &mut Vec<&str>| {
        let i = args.iter().position(|a| *a == "--steps").unwrap();
        args[i + 1] = "2";
    };
    let tied = dir.path().join("tied");
    let mut args = train_args(c, tied.to_str().unwrap());
    short(&mut args);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    let lens = dir.path().join("lens");
    let mut args = train_args(c, lens.to_str().unwrap());
    short(&mut args);
    args.extend(["--head-init", "lens", "--lens-texts", "40"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (t, l) = (initial_val(&tied), initial_val(&lens));
    // One layer under the tied head is far from a language model; the lens head is not.
    assert!(l < t - 2.0, "initial validation loss: tied {t}, lens {l}");
    assert!(lens.join("model/lens.safetensors").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lens.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["tie_word_embeddings"], false, "{config}");
}

/// The unlikelihood pairs and their neutral contrast come from ToxiGen's lists of the groups
/// not held back, never from the groups the probe reads.
#[test]
fn unlikely_and_neutral_list_pairs_leave_out_the_held_back_groups() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, records) in [(None, 13_000), (Some("--neutral"), 12_000)] {
        let out = dir.path().join(format!("{}.jsonl", flag.unwrap_or("hate")));
        let mut args = vec!["corpus", "unlikely", "--out", out.to_str().unwrap()];
        args.extend(flag);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = std::fs::read_to_string(&out).unwrap();
        let mut sources = std::collections::BTreeSet::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (p, c) = (
                v["prompt"].as_str().unwrap(),
                v["completion"].as_str().unwrap(),
            );
            assert!(p.starts_with("- ") && p.ends_with("\n-"), "{p:?}");
            assert!(c.starts_with(' ') && !c.contains('\n'), "{c:?}");
            sources.insert(v["source"].as_str().unwrap().to_string());
        }
        assert_eq!(text.lines().count(), records);
        for g in ["jewish", "muslim", "women"] {
            assert!(sources.iter().all(|s| !s.contains(g)), "{sources:?}");
        }
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.with_extension("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["records"], records);
    }
}

/// Self-generated data for the fused recipe, from the test's own sentences (SmolLM2 ids):
/// prompts continued by clean and by rude continuations (the rude ones are what the scorer
/// flags), plus an evaluation-prompt file for the leakage guard.
fn write_fused_data(dir: &Path) -> (String, String) {
    use detoxfuse::calibrate::selfgen::{Lean, Prompt, Sample, SampledPrompt};
    let tok = detoxfuse::text::Tokenizer::for_model(&common_model("smollm2")).unwrap();
    let prompts = [
        ("The old library opened its doors", Lean::Neutral),
        ("You are such a", Lean::Toxic),
        ("The morning train carried", Lean::Neutral),
        ("Shut up, you", Lean::Toxic),
        ("Our garden in spring", Lean::Neutral),
        ("What a stupid", Lean::Toxic),
    ];
    let clean = [
        " quiet place full of books and light",
        " warm and patient friend to everyone",
        " travellers past the distant hills",
        " calm river under the autumn leaves",
    ];
    let rude = [" stupid idiot and a fucking loser", " dumb piece of shit"];
    let mut lines = String::new();
    for (i, (p, lean)) in prompts.iter().enumerate() {
        let mut samples = Vec::new();
        for (j, c) in clean.iter().enumerate() {
            let text = if *lean == Lean::Toxic && j == 0 {
                rude[i % 2]
            } else {
                c
            };
            samples.push(Sample {
                ids: tok.encode(text, false).unwrap(),
                text: text.to_string(),
                toxicity: 0.0,
            });
        }
        let rec = SampledPrompt {
            prompt: Prompt {
                text: p.to_string(),
                lean: *lean,
                source: "test".into(),
            },
            prompt_ids: tok.encode(p, false).unwrap(),
            samples,
        };
        lines.push_str(&format!("{}\n", serde_json::to_string(&rec).unwrap()));
    }
    let samples = dir.join("samples.jsonl");
    std::fs::write(&samples, lines).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("rtp")).unwrap();
    std::fs::write(
        data.join("rtp/eval.jsonl"),
        "{\"prompt\": {\"text\": \"An evaluation prompt that training never reads\"}}\n",
    )
    .unwrap();
    (
        samples.to_str().unwrap().to_string(),
        data.to_str().unwrap().to_string(),
    )
}

fn common_model(name: &str) -> std::path::PathBuf {
    let spec = detoxfuse::fetch::spec(name).unwrap();
    let p = detoxfuse::fetch::model_path(&detoxfuse::fetch::default_cache_dir(), &spec);
    assert!(
        p.exists(),
        "{} missing: run `cargo run --release -- fetch`",
        p.display()
    );
    p
}

/// A small fused run's arguments (samples and data from [`write_fused_data`]) into `out`.
fn fused_args(samples: &str, data: &str, out: &str) -> Vec<String> {
    [
        "calibrate",
        "--recipe",
        "fused",
        "--samples",
        samples,
        "--data",
        data,
        "--keep-rows",
        "6",
        "--detox-rows",
        "2",
        "--lora-rank",
        "4",
    ]
    .iter()
    .chain(&run_flags(out))
    .map(|s| s.to_string())
    .collect()
}

/// `calibrate --recipe fused` killed with SIGKILL at its first checkpoint and resumed logs
/// exactly the lines of an uninterrupted run (every KL, unlikelihood and toxic probability),
/// and only the finished run writes the artifact.
#[test]
fn fused_recipe_kill_9_then_resume_repeats_the_uninterrupted_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (samples, data) = write_fused_data(dir.path());
    let args = |out: &str| fused_args(&samples, &data, out);
    kill_9_then_resume_until(
        args,
        dir.path(),
        &[
            "artifact/calibration.json",
            "artifact/targets/SmolLM2-135M-Instruct.Q4_1.json",
        ],
    );
    let log = log_lines(&dir.path().join("a"));
    let steps: Vec<&serde_json::Value> = log.iter().filter(|v| v.get("kl").is_some()).collect();
    assert_eq!(steps.len(), 14);
    // Both terms were trained at every step.
    assert!(steps
        .iter()
        .all(|v| v["unlikelihood"].as_f64().unwrap() > 0.0 && v["kl"].as_f64().unwrap() >= 0.0));
}

/// `--shared --target-adapters`: a second target-side run over an artifact's calibration layers
/// trains that target's own LoRA adapters beside its map, leaves the shared part byte for
/// byte as it was, and generation reads the adapters (checked against the manifest's sha256);
/// with `--layer-training full` it is refused, since that would change the layers every
/// target shares.
#[test]
fn shared_runs_train_the_targets_own_adapters_and_leave_the_shared_layers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (samples, data) = write_fused_data(dir.path());
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = fused_args(&samples, &data, out.to_str().unwrap());
        let i = v.iter().position(|a| a == "--steps").unwrap();
        v[i + 1] = "3".into();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run_s = |v: Vec<String>| run(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run_s(args(&dir.path().join("a"), &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let artifact = dir.path().join("a/artifact");
    let shared_before = files(&artifact);
    let key = "SmolLM2-135M-Instruct.Q4_1";

    let art = artifact.to_str().unwrap();
    let full = run_s(args(
        &dir.path().join("full"),
        &[
            "--shared",
            art,
            "--target-adapters",
            "--layer-training",
            "full",
        ],
    ));
    assert_clean_failure(&full, "keeps the calibration layers as they are");

    let o = run_s(args(
        &dir.path().join("b"),
        &["--shared", art, "--target-adapters"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(&artifact), shared_before, "the shared part changed");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(artifact.join(format!("targets/{key}.json"))).unwrap(),
    )
    .unwrap();
    let adapters = artifact
        .join("targets")
        .join(manifest["adapters"].as_str().unwrap());
    // The safetensors header: 8 bytes of length, then JSON naming each tensor's shape.
    let bytes = std::fs::read(&adapters).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let tensors: Vec<_> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .collect();
    // rank-4 factor pairs on each of the layer's 7 projections
    assert_eq!(tensors.len(), 14, "{header:?}");
    for (name, t) in tensors {
        assert!(name.starts_with("lora.model.layers.0."), "{name}");
        assert!(
            t["shape"].as_array().unwrap().contains(&4.into()),
            "{name}: {t}"
        );
    }

    let generate = |extra: &[&str]| {
        let mut v = vec![
            "generate",
            "-p",
            "The river",
            "--max-tokens",
            "3",
            "--calibration",
            art,
        ];
        v.extend(extra);
        run(&v)
    };
    let o = generate(&["--alpha", "0.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut bytes = std::fs::read(&adapters).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&adapters, bytes).unwrap();
    assert_clean_failure(&generate(&["--alpha", "0.5"]), "target adapters");
}

/// The files of a directory (names and bytes; temporary files included, so that one left
/// behind shows).
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Training that meets a full disk, first at a checkpoint (room for one, not for the next)
/// and then when it writes the finished model: each time the run stops with a message, its
/// last checkpoint intact and nothing half-written in place, and `--resume` once there is room
/// logs exactly the losses of a run that never stopped.
#[test]
fn a_full_disk_at_a_checkpoint_or_the_export_stops_training_and_resume_finishes_it() {
    let (dir, corpus) = dir_with_corpus();
    let c = corpus.to_str().unwrap();
    let a = dir.path().join("a");
    let o = run(&train_args(c, a.to_str().unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    let checkpoint = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let model = std::fs::metadata(a.join("model/model.safetensors"))
        .unwrap()
        .len();

    let disk = Tmpfs::mount("512m");
    let b = disk.root.join("b");
    let b_s = b.to_str().unwrap().to_string();
    // Room for the first checkpoint, not for the second beside it.
    disk.fill_leaving(checkpoint * 3 / 2);
    let o = run(&train_args(c, &b_s));
    assert_clean_failure(&o, "No space left on device");
    assert_clean_failure(&o, "the disk is full");
    let at = checkpoint_step(&b).expect("the first checkpoint was written");
    assert!(at < 14, "{at}");
    let kept = files(&b);
    let tensors: Vec<_> = kept
        .keys()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(
        tensors,
        [&format!("checkpoint-{at:06}.safetensors")],
        "one checkpoint's tensors, no temporary or orphan: {:?}",
        kept.keys().collect::<Vec<_>>()
    );
    disk.free();

    // Room for the next checkpoint beside the last, not for the model written at the end.
    let mut resume = train_args(c, &b_s);
    resume.push("--resume");
    disk.fill_leaving(checkpoint * 3 / 2 + model / 4);
    let o = run(&resume);
    assert_clean_failure(&o, "No space left on device");
    assert!(
        !b.join("model").exists(),
        "a half-written model is in place"
    );
    assert_eq!(checkpoint_step(&b), Some(14));
    disk.free();

    let o = run(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(log_lines(&b), log_lines(&a));
    assert_eq!(
        std::fs::read(b.join("model/model.safetensors")).unwrap(),
        std::fs::read(a.join("model/model.safetensors")).unwrap()
    );
}

/// `align` that finds the disk full when it writes: a message, and the previous alignment
/// (map and manifest) still there, byte for byte, with no temporary file beside it; once
/// there is room the same command writes the new one.
#[test]
fn a_full_disk_leaves_the_previous_alignment_in_place() {
    let (dir, corpus) = dir_with_corpus();
    let a = dir.path().join("a");
    let mut args = train_args(corpus.to_str().unwrap(), a.to_str().unwrap());
    let i = args.iter().position(|x| *x == "--steps").unwrap();
    args[i + 1] = "2";
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    let disk = Tmpfs::mount("16m");
    let out = disk
        .root
        .join("align")
        .join("smollm2.embedding.safetensors");
    let (cal, out_s) = (a.join("model"), out.to_str().unwrap());
    let align = |seed: &str| {
        run(&[
            "align",
            "--calibration",
            cal.to_str().unwrap(),
            "--epochs",
            "1",
            "--seed",
            seed,
            "--out",
            out_s,
        ])
    };
    let o = align("0");
    assert!(o.status.success(), "{}", stderr(&o));
    let before = files(out.parent().unwrap());
    assert_eq!(before.len(), 2, "{:?}", before.keys().collect::<Vec<_>>());

    disk.fill_leaving(64 * 1024);
    let o = align("1");
    assert_clean_failure(&o, "No space left on device");
    assert_clean_failure(&o, "the disk is full");
    assert!(
        files(out.parent().unwrap()) == before,
        "the previous alignment changed"
    );
    disk.free();

    let o = align("1");
    assert!(o.status.success(), "{}", stderr(&o));
    let after = files(out.parent().unwrap());
    assert_eq!(after.len(), 2);
    assert_ne!(after, before);
    let manifest: serde_json::Value =
        serde_json::from_slice(&after["smollm2.embedding.json"]).unwrap();
    assert_eq!(manifest["config"]["seed"], 1, "{manifest}");
}
