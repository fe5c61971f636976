//! `detoxfuse eval`: the field's protocol (EVALUATION.md) for the untouched target, the fused
//! model at several alphas and the two baselines, in one resumable run.

use std::path::Path;

use anyhow::Result;
use detoxfuse::eval::options::EvalOptions;
use detoxfuse::eval::protocol::{self, EvalObserver};
use detoxfuse::hub::Hub;
use indicatif::ProgressBar;

use crate::calibrate::TrainPrinter;

/// Moves the bar; when stderr is not a terminal (a run under nohup, a log file) the bar is
/// invisible, so a plain progress line goes out every 50 prompts instead.
fn advance(pb: &ProgressBar, done: usize, total: usize) {
    let resumed = pb.position() == 0 && done > 0;
    pb.set_position(done as u64);
    if resumed {
        // prompts finished by an earlier run say nothing about this run's rate
        pb.reset_eta();
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stderr())
        && done > 0
        && (done.is_multiple_of(50) || done == total)
    {
        eprintln!(
            "{}: {done}/{total} prompts, {:.0} s elapsed, eta {:.0} s",
            pb.prefix().trim(),
            pb.elapsed().as_secs_f64(),
            pb.eta().as_secs_f64()
        );
    }
}

/// The run's phases on a bar each (training on first use goes to the printer's step bar).
impl EvalObserver for TrainPrinter {
    fn phase(&mut self, what: &str, total: usize) {
        if let Some(pb) = self.phase.take() {
            pb.finish_and_clear();
        }
        self.phase = Some(crate::progress_bar(
            total as u64,
            &format!("{what:>22}"),
            Some("prompts"),
        ));
    }
    fn advance(&mut self, done: usize, total: usize) {
        if let Some(pb) = &self.phase {
            advance(pb, done, total);
        }
    }
}

pub fn run(cache: &Path, a: EvalOptions) -> Result<()> {
    let plan = a.plan(
        std::env::args().collect::<Vec<_>>().join(" "),
        // The source revision this binary was built from (recorded by `build.rs`).
        env!("DETOXFUSE_COMMIT").to_string(),
    )?;
    let mut p = TrainPrinter::new(0, false, "calibrate");
    let outcome = protocol::run(&Hub::new(cache), &plan, &mut p);
    p.finish();
    let o = outcome?;
    println!("{}", o.markdown);
    println!(
        "report: {0}/report.md, {0}/report.json, {0}/report.svg; generations in {0}/generations/",
        o.out.display()
    );
    Ok(())
}
