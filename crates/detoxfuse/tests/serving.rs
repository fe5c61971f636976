//! The serving engine without HTTP or an async runtime, on the real SmolLM2: a request's
//! events, validation, back-pressure and cancellation.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use detoxfuse::generate::{generate, GenerationConfig, PlainDecoder};
use detoxfuse::serving::{Engine, EventSink, JobEvent, Limits, Params, RejectKind};
use detoxfuse::text::Tokenizer;

fn limits() -> Limits {
    Limits {
        queue: 4,
        timeout: Duration::from_secs(60),
        max_n: 4,
        default_alpha: 0.2,
        ..Limits::default()
    }
}

fn engine_with(limits: Limits) -> (Engine, detoxfuse::serving::Worker) {
    let path = common::model("smollm2");
    let target = detoxfuse::lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    Engine::start(target, tok, None, limits).unwrap()
}

fn drain(rx: &Receiver<JobEvent>) -> (Vec<(usize, String)>, Vec<detoxfuse::generate::Generation>) {
    let mut deltas = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).unwrap() {
            JobEvent::Delta { index, text } => deltas.push((index, text)),
            JobEvent::Done(r) => return (deltas, r.unwrap()),
        }
    }
}

#[test]
fn a_request_streams_its_deltas_then_the_same_text_as_generate() {
    let (engine, worker) = engine_with(limits());
    // Without a calibration the default α is 0 and α > 0 is refused.
    assert_eq!(engine.limits().default_alpha, 0.0);
    let bad = engine
        .prepare(
            &Params {
                alpha: Some(0.3),
                ..Params::default()
            },
            "Hi",
            false,
        )
        .unwrap_err();
    assert_eq!((bad.kind, bad.param), (RejectKind::Invalid, Some("alpha")));
    let params = Params {
        n: Some(2),
        max_tokens: Some(6),
        seed: Some(7),
        temperature: Some(1.0),
        top_p: Some(0.9),
        ..Params::default()
    };
    let p = engine
        .prepare(&params, "The weather today is", false)
        .unwrap();
    let (tx, rx) = channel();
    engine.submit(&p, Box::new(tx)).unwrap();
    let (deltas, gens) = drain(&rx);
    assert_eq!(gens.len(), 2);
    for (i, g) in gens.iter().enumerate() {
        let streamed: String = deltas
            .iter()
            .filter(|(k, _)| *k == i)
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(
            streamed, g.text,
            "sample {i}: the deltas add up to the text"
        );
    }
    // The same request through the library's plain generate: the same texts.
    let model = detoxfuse::lm::load(&common::model("smollm2")).unwrap();
    let tok = Tokenizer::for_model(&common::model("smollm2")).unwrap();
    let cfg: GenerationConfig = p.cfg.clone();
    let direct = generate(&mut PlainDecoder::new(model.as_ref()), &tok, &p.ids, &cfg).unwrap();
    let texts = |g: &[detoxfuse::generate::Generation]| {
        g.iter().map(|x| x.text.clone()).collect::<Vec<_>>()
    };
    assert_eq!(texts(&gens), texts(&direct));
    // An empty prompt starts from the BOS token, as `generate` does.
    let empty = engine
        .prepare(
            &Params {
                max_tokens: Some(3),
                ..Params::default()
            },
            "",
            false,
        )
        .unwrap();
    let (tx, rx) = channel();
    engine.submit(&empty, Box::new(tx)).unwrap();
    let (_, gens) = drain(&rx);
    let direct = generate(
        &mut PlainDecoder::new(model.as_ref()),
        &tok,
        &[],
        &empty.cfg,
    )
    .unwrap();
    assert_eq!(texts(&gens), texts(&direct));
    drop(engine);
    worker.join().unwrap();
}

/// A sink whose listener is gone from the start.
struct Gone;
impl EventSink for Gone {
    fn send(&mut self, _: JobEvent) -> bool {
        false
    }
    fn is_closed(&self) -> bool {
        true
    }
}

#[test]
fn a_full_queue_refuses_at_once_and_a_closed_sink_costs_no_work() {
    // One row a step: the first request fills the batch, the second waits in the queue's
    // one place, the third is refused.
    let (engine, worker) = engine_with(Limits {
        queue: 1,
        max_n: 1,
        max_batch: 1,
        ..limits()
    });
    let long = Params {
        max_tokens: Some(48),
        ..Params::default()
    };
    let p = engine.prepare(&long, "Once upon a time", false).unwrap();
    let (tx, rx) = channel();
    engine.submit(&p, Box::new(tx)).unwrap(); // runs
                                              // Wait for it to start (its first delta), so the queue's one place is free again.
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        JobEvent::Delta { .. }
    ));
    let (tx2, rx2) = channel();
    engine.submit(&p, Box::new(tx2)).unwrap(); // waits for room in the batch
    let busy = engine.submit(&p, Box::new(Gone)).unwrap_err();
    assert_eq!(busy.kind, RejectKind::Busy);
    let (_, gens) = drain(&rx);
    assert_eq!(gens[0].token_ids.len(), 48);
    let (_, gens2) = drain(&rx2);
    assert_eq!(
        gens2[0].token_ids, gens[0].token_ids,
        "same request, same seed"
    );
    // A job whose listener is gone before it starts is skipped: the queue is free at once.
    engine.submit(&p, Box::new(Gone)).unwrap();
    let (tx3, rx3) = channel();
    let short = engine
        .prepare(
            &Params {
                max_tokens: Some(2),
                ..Params::default()
            },
            "Hi",
            false,
        )
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        match engine.submit(&short, Box::new(tx3.clone())) {
            Ok(()) => break,
            Err(e) => assert_eq!(e.kind, RejectKind::Busy),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the skipped job held its place"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drain(&rx3);
    // Too long for the context: refused before any work.
    let huge = Params {
        max_tokens: Some(1 << 20),
        ..Params::default()
    };
    let e = engine.prepare(&huge, "x", false).unwrap_err();
    assert_eq!(e.kind, RejectKind::ContextLength);
    drop(engine);
    worker.join().unwrap();
}

#[test]
fn token_limits_refuse_a_greedy_request_and_a_full_token_pool() {
    let path = common::model("smollm2");
    let (engine, worker) = Engine::start(
        detoxfuse::lm::load(&path).unwrap(),
        Tokenizer::for_model(&path).unwrap(),
        None,
        Limits {
            max_n: 8,
            max_request_tokens: 64,
            max_queued_tokens: 100,
            ..Limits::default()
        },
    )
    .unwrap();
    let ask = |n, max_tokens| Params {
        n: Some(n),
        max_tokens: Some(max_tokens),
        ..Params::default()
    };
    // n × max_tokens beyond the request limit, in either factor
    for (n, m) in [(8, 9), (1, 65)] {
        let e = engine.prepare(&ask(n, m), "Hi", false).unwrap_err();
        assert_eq!(
            (e.kind, e.code),
            (RejectKind::Invalid, Some("request_too_large"))
        );
    }
    // within it, but beyond what the server holds at once with the prompt
    let long = "word ".repeat(60);
    let e = engine.prepare(&ask(2, 30), &long, false).unwrap_err();
    assert_eq!(e.code, Some("request_too_large"));
    // two requests of 60 tokens each do not fit in a pool of 100 together
    let p = engine
        .prepare(&ask(1, 48), "Once upon a time, in a", false)
        .unwrap();
    assert!(p.ids.len() + 48 > 50);
    let (tx, rx) = channel();
    engine.submit(&p, Box::new(tx)).unwrap();
    let busy = engine.submit(&p, Box::new(Gone)).unwrap_err();
    assert_eq!(busy.kind, RejectKind::Busy);
    drain(&rx);
    // once the first is done its tokens are free again
    let (tx, rx) = channel();
    engine.submit(&p, Box::new(tx)).unwrap();
    drain(&rx);
    drop(engine);
    worker.join().unwrap();
}

/// A fusion for batching tests: SmolLM2's first 3 layers at initialisation and a seeded random
/// A (the real architecture, untrained: these tests are about the scheduler, not detoxification).
fn test_fusion(dir: &std::path::Path) -> detoxfuse::calibration::Fusion {
    use detoxfuse::lm::export::{hf_llama_from_gguf, write_hf_dir};
    use rand::{Rng, SeedableRng};
    let out = dir.join("cal");
    let base = hf_llama_from_gguf(&common::model("smollm2"), Some(3)).unwrap();
    write_hf_dir(&base, &out, &[]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let v: Vec<f32> = (0..576 * 576)
        .map(|_| rng.random_range(-0.1..0.1))
        .collect();
    let a = candle_core::Tensor::from_vec(v, (576, 576), &candle_core::Device::Cpu).unwrap();
    detoxfuse::calibration::Fusion {
        model: detoxfuse::lm::load_with(&out, detoxfuse::lm::LoadOptions { dequantize: true })
            .unwrap(),
        tokenizer: Tokenizer::for_model(&out).unwrap(),
        map: detoxfuse::fuse::FusionMap::paper(&a).unwrap(),
        calibration: out.clone(),
        alignment: out,
    }
}

fn f32_engine(fusion: detoxfuse::calibration::Fusion) -> (Engine, detoxfuse::serving::Worker) {
    let path = common::model("smollm2");
    Engine::start(
        detoxfuse::lm::load_with(&path, detoxfuse::lm::LoadOptions { dequantize: true }).unwrap(),
        Tokenizer::for_model(&path).unwrap(),
        Some(fusion),
        Limits {
            queue: 16,
            max_n: 4,
            ..Limits::default()
        },
    )
    .unwrap()
}

/// With f32 weights a request's text does not depend on what else is in the batch: nine
/// requests with a mix of α (0, 0.2, 0.5) and of n (1 to 3), each run alone and then all
/// submitted at once (18 rows in one batch), give the same tokens at the same seeds.
#[test]
fn a_request_gives_the_same_text_alone_and_inside_a_batch_of_others() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, worker) = f32_engine(test_fusion(dir.path()));
    let prompts = [
        "The weather today is",
        "My favourite recipe for soup",
        "In 1969 the first",
        "People who drive slowly are",
        "Dear hiring manager, I",
        "The best way to learn Rust",
        "Once upon a time in a small",
        "Scientists announced that",
        "You are such an",
    ];
    let requests: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let params = Params {
                alpha: Some([0.0, 0.2, 0.5][i % 3]),
                n: Some(1 + i % 3),
                max_tokens: Some(16),
                seed: Some(100 + i as u64),
                temperature: Some(1.0),
                top_p: Some(0.9),
                ..Params::default()
            };
            engine.prepare(&params, text, false).unwrap()
        })
        .collect();
    let ids = |g: Vec<detoxfuse::generate::Generation>| -> Vec<Vec<u32>> {
        g.into_iter().map(|x| x.token_ids).collect()
    };
    let alone: Vec<Vec<Vec<u32>>> = requests
        .iter()
        .map(|p| {
            let (tx, rx) = channel();
            engine.submit(p, Box::new(tx)).unwrap();
            ids(drain(&rx).1)
        })
        .collect();
    let load = engine.load();
    let busiest = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (busiest, stop) = (busiest.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                busiest.fetch_max(load.rows(), std::sync::atomic::Ordering::AcqRel);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let receivers: Vec<_> = requests
        .iter()
        .map(|p| {
            let (tx, rx) = channel();
            engine.submit(p, Box::new(tx)).unwrap();
            rx
        })
        .collect();
    let together: Vec<Vec<Vec<u32>>> = receivers.iter().map(|rx| ids(drain(rx).1)).collect();
    stop.store(true, std::sync::atomic::Ordering::Release);
    watcher.join().unwrap();
    let busiest = busiest.load(std::sync::atomic::Ordering::Acquire);
    eprintln!("most rows in one step: {busiest}");
    assert!(
        busiest >= 9,
        "the requests did not share the batch (at most {busiest} rows)"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), 1 + i % 3);
        assert_eq!(
            a,
            t,
            "request {i} (α {}) alone vs in the batch",
            [0.0, 0.2, 0.5][i % 3]
        );
    }
    drop(engine);
    worker.join().unwrap();
}

/// A sink that logs the batch's rows at each of its sample-0 deltas and, when told, reports
/// its listener gone after that many (as a stream whose client disconnected does).
struct Probe {
    name: char,
    log: std::sync::Arc<std::sync::Mutex<Vec<(char, usize)>>>,
    load: detoxfuse::serving::Load,
    close_after: Option<usize>,
    seen: usize,
    closed: bool,
    events: std::sync::mpsc::Sender<JobEvent>,
}

impl EventSink for Probe {
    fn send(&mut self, e: JobEvent) -> bool {
        if let JobEvent::Delta { index: 0, .. } = e {
            self.seen += 1;
            let mut log = self.log.lock().unwrap();
            log.push((self.name, self.load.rows()));
            if self.close_after == Some(self.seen) {
                self.closed = true;
                log.push((self.name, usize::MAX));
            }
        }
        let _ = self.events.send(e);
        true
    }
    fn is_closed(&self) -> bool {
        self.closed
    }
}

/// A client that disconnects mid-stream frees its rows at the next step: the other request's
/// next deltas already see the batch without them.
#[test]
fn a_client_that_disconnects_frees_its_rows_at_the_next_step() {
    let (engine, worker) = engine_with(limits());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let greedy = |n| Params {
        n: Some(n),
        max_tokens: Some(40),
        temperature: Some(0.0),
        ..Params::default()
    };
    let probe = |name, close_after, events| Probe {
        name,
        log: log.clone(),
        load: engine.load(),
        close_after,
        seen: 0,
        closed: false,
        events,
    };
    let (ta, ra) = channel();
    let (tb, rb) = channel();
    let a = engine
        .prepare(&greedy(3), "Once upon a time", false)
        .unwrap();
    let b = engine
        .prepare(&greedy(2), "The history of the city", false)
        .unwrap();
    engine
        .submit(&a, Box::new(probe('A', Some(8), ta)))
        .unwrap();
    engine.submit(&b, Box::new(probe('B', None, tb))).unwrap();
    let (_, gens_a) = drain(&ra);
    let (_, gens_b) = drain(&rb);
    assert!(gens_a[0].token_ids.len() < 40, "A was not stopped");
    assert_eq!(gens_b[0].token_ids.len(), 40);
    let log = log.lock().unwrap().clone();
    let closed_at = log.iter().position(|e| *e == ('A', usize::MAX)).unwrap();
    let b_rows: Vec<usize> = log.iter().filter(|e| e.0 == 'B').map(|e| e.1).collect();
    let b_before = log[..closed_at].iter().filter(|e| e.0 == 'B').count();
    assert!(
        b_rows[..b_before].contains(&5),
        "A and B never shared the batch: {log:?}"
    );
    // B's deltas in the step A closed and the next show the step before; the one after, B alone.
    assert_eq!(b_rows[b_before + 2], 2, "{log:?}");
    assert!(b_rows[b_before + 2..].iter().all(|&r| r == 2), "{log:?}");
    drop(engine);
    worker.join().unwrap();
}
