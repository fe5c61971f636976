//! The serving engine without HTTP or an async runtime, on the real SmolLM2: a request's
//! events, validation, back-pressure and cancellation.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use detoxfuse::generate::{generate, GenerationConfig, PlainDecoder};
use detoxfuse::serving::{Engine, EventSink, JobEvent, Limits, Params, RejectKind};
use detoxfuse::text::Tokenizer;

fn engine(queue: usize) -> (Engine, detoxfuse::serving::Worker) {
    let path = common::model("smollm2");
    let target = detoxfuse::lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    Engine::start(
        target,
        tok,
        None,
        Limits {
            queue,
            timeout: Duration::from_secs(60),
            max_n: 4,
            default_alpha: 0.2,
            ..Limits::default()
        },
    )
    .unwrap()
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
    let (engine, worker) = engine(4);
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
    let (engine, worker) = engine(1);
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
    engine.submit(&p, Box::new(Gone)).unwrap(); // waits in the queue's one place
    let busy = engine.submit(&p, Box::new(Gone)).unwrap_err();
    assert_eq!(busy.kind, RejectKind::Busy);
    let (_, gens) = drain(&rx);
    assert_eq!(gens[0].token_ids.len(), 48);
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
