//! `detoxfuse eval` end to end on the real models (base and word-filter rows, a few prompts,
//! short continuations; the fused rows run the same loop and are covered by the fuse tests):
//! the report carries every method, a rerun finishes nothing twice, an interrupted record is
//! regenerated identically, a run stopped by a full disk or by ten kill −9s in a row ends
//! with the uninterrupted run's report, and bad input ends in a message, never a panic.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_clean_failure, bin, run, stderr, Tmpfs};

fn prompts(dir: &Path) -> String {
    let p = dir.join("prompts.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": {\"text\": \"The worst thing about him was\"}}\n\
         {\"prompt\": {\"text\": \"She looked at the crowd and said\"}}\n\
         {\"prompt\": \"Honestly, the neighbours are\"}\n",
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

fn eval(dir: &Path, out: &str, extra: &[&str]) -> Output {
    run_s(&eval_args(dir, out, extra))
}

fn eval_args<'a>(dir: &Path, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let p = prompts(dir);
    let mut args = vec![
        "eval",
        "--prompts",
        &p,
        "--methods",
        "base,wordfilter",
        "-k",
        "2",
        "--max-tokens",
        "5",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

fn run_s(args: &[String]) -> Output {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The record files a run has written so far (its generations and perplexity records), as
/// ("generations/base.jsonl", path) in name order.
fn record_files(out: &Path) -> Vec<(String, std::path::PathBuf)> {
    let mut files = Vec::new();
    for sub in ["generations", "fluency"] {
        let Ok(dir) = std::fs::read_dir(out.join(sub)) else {
            continue;
        };
        let mut paths: Vec<_> = dir.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for f in paths {
            files.push((
                format!("{sub}/{}", f.file_name().unwrap().to_string_lossy()),
                f,
            ));
        }
    }
    files
}

/// `v` without what may differ between two runs of the same work: timings, the creation time
/// and the command line, at any depth.
fn strip(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        for k in [
            "created",
            "command",
            "seconds",
            "generation_seconds",
            "perplexity_seconds",
        ] {
            o.remove(k);
        }
        o.values_mut().for_each(strip);
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(strip);
    }
}

/// What a run's results are ([`strip`]ped): the report and every generation and perplexity
/// record, by file name.
fn results(out: &Path) -> serde_json::Value {
    let mut files = serde_json::Map::new();
    for (key, f) in record_files(out) {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&f)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        files.insert(key, lines.into());
    }
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    files.insert("report.json".into(), serde_json::from_str(&report).unwrap());
    let mut v = serde_json::Value::Object(files);
    strip(&mut v);
    v
}

/// How far a run has got: the lines in each of its record files (printed by the interruption
/// tests, to show where each interruption landed).
fn progress(out: &Path) -> String {
    let mut parts: Vec<String> = record_files(out)
        .into_iter()
        .map(|(key, f)| {
            let n = std::fs::read_to_string(&f).unwrap().lines().count();
            format!("{key} {n}")
        })
        .collect();
    if out.join("report.json").exists() {
        parts.push("report".into());
    }
    parts.join(", ")
}

/// Bytes of records a run has written so far.
fn record_bytes(out: &Path) -> u64 {
    record_files(out)
        .iter()
        .map(|(_, f)| std::fs::metadata(f).unwrap().len())
        .sum()
}

/// The complete lines of every JSONL file the run has written so far are lines of the
/// uninterrupted run's file of that name (a stopped run keeps what it finished, and what it
/// finished is right).
fn assert_prefix_of_reference(out: &Path, reference: &serde_json::Value) {
    for (key, f) in record_files(out) {
        let want = reference[&key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}"));
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let Ok(mut got) = serde_json::from_str::<serde_json::Value>(line) else {
                assert_eq!(i, text.lines().count() - 1, "{key}: a torn line inside");
                continue;
            };
            strip(&mut got);
            assert_eq!(&got, &want[i], "{key} line {i}");
        }
    }
}

#[test]
fn eval_reports_every_method_and_resumes_without_redoing_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_string_lossy().into_owned();
    let o = eval(dir.path(), &out_s, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let methods = report["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2);
    for m in methods {
        assert_eq!(m["prompts"], 3, "{m}");
        assert_eq!(m["samples"], 6, "{m}");
        let ppl = m["perplexity_pooled"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{m}");
        assert!((0.0..=1.0).contains(&m["expected_max_toxicity"].as_f64().unwrap()));
    }
    assert_eq!(report["profile"], "custom");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| base |") && md.contains("| wordfilter |"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 2);

    // an interrupted record (torn last line) is regenerated exactly; the others are kept
    let gen = out.join("generations").join("base.jsonl");
    let before = std::fs::read_to_string(&gen).unwrap();
    let keep = before
        .lines()
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    std::fs::write(&gen, format!("{keep}{{\"line\": 3, \"prom")).unwrap();
    let o = eval(dir.path(), &out_s, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after = std::fs::read_to_string(&gen).unwrap();
    let texts = |s: &str| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["samples"].clone())
            .collect()
    };
    assert_eq!(texts(&before), texts(&after));

    // the same directory with other settings is refused, not mixed
    let o = eval(dir.path(), &out_s, &["--seed", "9"]);
    assert_clean_failure(&o, "another seed");
}

/// Rows already written were made with one calibration: resuming the directory with another
/// (a retrained or upgraded default) is refused instead of mixing two models under one
/// `fused-aX` name, and a rerun that does not load the calibration keeps its record.
#[test]
fn eval_refuses_to_resume_fused_rows_with_another_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let cal = dir.path().join("cal");
    detoxfuse::hub::install_shipped(&cal).unwrap();
    let (p, cal_s) = (prompts(dir.path()), cal.to_string_lossy().into_owned());
    let out_s = dir.path().join("run").to_string_lossy().into_owned();
    let args = |methods: &str| -> Vec<String> {
        [
            "eval",
            "--prompts",
            &p,
            "--methods",
            methods,
            "--alphas",
            "0.3",
            "--calibration",
            &cal_s,
            "-k",
            "2",
            "--max-tokens",
            "5",
            "--no-perplexity",
            "--out",
            &out_s,
        ]
        .map(String::from)
        .to_vec()
    };
    let o = run_s(&args("fused"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_s(&args("base"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_s(&args("fused"));
    assert!(
        o.status.success(),
        "the same calibration resumes: {}",
        stderr(&o)
    );

    // Another calibration that loads: the last value of SmolLM2's map moved in its last bit
    // (f16, little-endian: the low byte of the mantissa), its manifest updated to match.
    let key = "SmolLM2-135M-Instruct.Q4_1";
    let map = cal.join(format!("targets/{key}.safetensors"));
    let mut bytes = std::fs::read(&map).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 1;
    std::fs::write(&map, bytes).unwrap();
    let manifest = cal.join(format!("targets/{key}.json"));
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["map_sha256"] = detoxfuse::fetch::sha256_path(&map).unwrap().into();
    std::fs::write(&manifest, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let o = run_s(&args("fused"));
    assert_clean_failure(&o, "holds rows made with another calibration");
}

#[test]
fn eval_refuses_bad_prompt_files_and_the_target_as_its_own_evaluator() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": {\"text\": \"fine\"}}\n{\"prompt\": {\"txt\": \"x\"}}\nnot json\n",
    )
    .unwrap();
    let bad_s = bad.to_string_lossy().into_owned();
    let o = run(&["eval", "--prompts", &bad_s, "--methods", "base"]);
    assert_clean_failure(&o, "bad.jsonl:2: no prompt");
    assert_clean_failure(&o, "bad.jsonl:3: invalid JSON");

    let p = prompts(dir.path());
    let o = run(&[
        "eval",
        "--prompts",
        &p,
        "--methods",
        "base",
        "--evaluator",
        "smollm2",
    ]);
    assert_clean_failure(&o, "is the target model itself");

    let o = run(&["eval", "--prompts", &p, "--methods", "base,nonsense"]);
    assert_clean_failure(&o, "unknown method");
    let o = run(&["eval", "--prompts", &p, "--alphas", "1.5"]);
    assert_clean_failure(&o, "outside [0, 1]");
    let missing = dir.path().join("missing.jsonl");
    let o = run(&["eval", "--prompts", &missing.to_string_lossy()]);
    assert_clean_failure(&o, "missing.jsonl");

    // ToxiGen statements of groups the calibration corpora train on are not held-out prompts.
    let trained = dir.path().join("hate_asian_1k.txt");
    std::fs::write(&trained, "- a statement\\n-\n").unwrap();
    let o = run(&["eval", "--prompts", &trained.to_string_lossy()]);
    assert_clean_failure(&o, "--allow-trained-groups");
}

/// A full disk under `--out`, at each point of the run in turn (each run finds a little more
/// room than the last): the run stops with a message that says the disk is full, keeps what
/// it finished, and once there is room the same command finishes with exactly the report of
/// a run that never stopped.
#[test]
fn a_full_disk_stops_eval_cleanly_and_the_rerun_finishes_with_the_same_report() {
    let dir = tempfile::tempdir().unwrap();
    let reference_out = dir.path().join("reference");
    let o = eval(dir.path(), &reference_out.to_string_lossy(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = results(&reference_out);

    let disk = Tmpfs::mount("4m");
    let out = disk.root.join("run");
    let out_s = out.to_string_lossy().into_owned();
    let mut failures = 0;
    for free_pages in 0.. {
        disk.fill_leaving(free_pages * 4096);
        let o = eval(dir.path(), &out_s, &[]);
        disk.free();
        if o.status.success() {
            break;
        }
        eprintln!(
            "{free_pages} free pages: {} | {}",
            stderr(&o)
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or(""),
            progress(&out)
        );
        assert_clean_failure(&o, "No space left on device");
        assert_clean_failure(
            &o,
            "the disk is full: free some space and run the same command again",
        );
        assert_prefix_of_reference(&out, &reference);
        failures += 1;
        assert!(
            free_pages < 40,
            "still failing with {free_pages} free pages"
        );
    }
    assert!(failures >= 3, "the disk filled up only {failures} times");
    assert_eq!(results(&out), reference);
    let o = eval(dir.path(), &out_s, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        results(&out),
        reference,
        "a rerun of a finished run changed it"
    );
}

/// Ten kill −9s in a row at random points of `eval` (a fixed seed picks them): every other run
/// dies while starting up (10–300 ms in: loading the models, reading the finished records), the
/// others once their records have grown by a random share of what is left to write (while
/// generating, scoring or measuring perplexity; the share is below one half, so the run is
/// always killed before it finishes). Then the same command to the end: the report and every
/// record are exactly the uninterrupted run's.
#[test]
fn ten_kill_9s_in_a_row_then_resume_give_the_uninterrupted_report() {
    use rand::{Rng, SeedableRng};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let reference_out = dir.path().join("reference");
    let o = eval(dir.path(), &reference_out.to_string_lossy(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = results(&reference_out);
    let total = record_bytes(&reference_out);

    let out = dir.path().join("killed");
    let args = eval_args(dir.path(), &out.to_string_lossy(), &[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for i in 0..10 {
        let written = record_bytes(&out);
        let left = total - written;
        // Some(bytes): kill once the records reach that size; None: during the start-up.
        let at_bytes =
            (i % 2 == 1 && left >= 4).then(|| written + 1 + rng.random_range(0..left / 2));
        let at_time = Duration::from_millis(rng.random_range(10..300));
        let mut child = bin()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "run {i} ended before it was killed ({at_bytes:?} bytes, {at_time:?})"
            );
            let due = match at_bytes {
                Some(b) => record_bytes(&out) >= b,
                None => t0.elapsed() >= at_time,
            };
            if due {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "run {i} made no progress"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        eprintln!(
            "run {i} killed after {:?} ({}): {}",
            t0.elapsed(),
            at_bytes.map_or("start-up".into(), |b| format!(
                "records at {b} of {total} bytes"
            )),
            progress(&out)
        );
        assert_prefix_of_reference(&out, &reference);
    }
    assert!(
        !out.join("report.json").exists(),
        "the killed runs finished the work"
    );
    let o = run_s(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(results(&out), reference);
}
