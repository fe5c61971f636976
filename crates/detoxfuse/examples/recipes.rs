//! Asks the hub for the named calibration recipes through the library alone (no binary):
//! the paper recipe's model (the DExperts expert) and the DExperts anti-expert, trained in
//! this process when the cache lacks them (about 50 and 40 minutes on 2 cores; an
//! interrupted run resumes), and the shipped fused default (installed, never trained).
//!
//! `cargo run --release -p detoxfuse --example recipes [-- paper|anti-expert|fused-default ...]`

use detoxfuse::fetch::Progress;
use detoxfuse::hub::Hub;
use detoxfuse::recipes::{Observer, Recipe};

/// Prints notes, stages and every 20th training step.
struct Lines;
impl Progress for Lines {
    fn stage(&mut self, msg: &str) {
        eprintln!("{msg}");
    }
    fn bytes(&mut self, _: u64, _: u64) {}
}
impl Observer for Lines {
    fn note(&mut self, msg: &str) {
        eprintln!("{msg}");
    }
    fn train_event(&mut self, e: detoxfuse::calibrate::train::Event) {
        use detoxfuse::calibrate::train::Event;
        match e {
            Event::Step(s) if s.step % 20 == 0 => {
                eprintln!("step {} loss {:.4}", s.step, s.loss)
            }
            Event::Validation { step, loss, .. } => {
                eprintln!("step {step} validation loss {loss:.4}")
            }
            _ => {}
        }
    }
}

fn main() -> detoxfuse::Result<()> {
    let hub = Hub::from_env();
    let mut asked: Vec<String> = std::env::args().skip(1).collect();
    if asked.is_empty() {
        asked = vec!["paper".into(), "anti-expert".into(), "fused-default".into()];
    }
    for name in asked {
        let dir = match name.as_str() {
            "paper" => hub.calibration(Recipe::Paper, &mut Lines)?,
            "anti-expert" => hub.calibration(Recipe::AntiExpert, &mut Lines)?,
            "fused-default" => hub.fused_default()?,
            other => {
                return Err(detoxfuse::Error::Input(format!(
                    "unknown recipe {other:?}; choose paper, anti-expert or fused-default"
                )))
            }
        };
        println!("{name}: {}", dir.display());
    }
    Ok(())
}
