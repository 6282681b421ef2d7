//! Apply's progress on the terminal: a bar when stderr is a terminal, one plain
//! line per step otherwise (what CI logs and tests read).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use reconciler::apply::{ApplyEvents, StepOutcome};
use reconciler::state::StepStatus;

/// Prints apply's progress.
#[derive(Debug)]
pub enum Progress {
    /// A bar (stderr is a terminal).
    Bar(Mutex<Option<indicatif::ProgressBar>>),
    /// One line per step on stdout.
    Lines,
}

impl Progress {
    /// A bar when stderr is a terminal, else lines.
    pub fn new() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Bar(Mutex::new(None))
        } else {
            Progress::Lines
        }
    }
}

/// The line of one ended step.
fn line(outcome: &StepOutcome) -> String {
    let what = &outcome.what;
    match (outcome.status, &outcome.error) {
        (StepStatus::Skipped, e) => format!("skipped: {what} — {}", e.as_deref().unwrap_or("")),
        (StepStatus::Succeeded, _) if outcome.replayed => {
            format!("ok (already done by the node): {what}")
        }
        (StepStatus::Succeeded, _) => format!("ok: {what} ({} ms)", outcome.millis),
        (_, e) => format!("failed: {what} — {}", e.as_deref().unwrap_or("")),
    }
}

impl ApplyEvents for Progress {
    fn started(&self, steps: usize) {
        if let Progress::Bar(bar) = self {
            let b = indicatif::ProgressBar::new(steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            *bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(b);
        }
    }

    fn step_ended(&self, outcome: &StepOutcome) {
        let text = line(outcome);
        match self {
            Progress::Bar(bar) => {
                if let Some(bar) = bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    bar.inc(1);
                    bar.set_message(text.clone());
                    if outcome.status != StepStatus::Succeeded {
                        bar.println(text);
                    }
                }
            }
            Progress::Lines => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    fn finished(&self) {
        if let Progress::Bar(bar) = self
            && let Some(bar) = bar.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            bar.finish_and_clear();
        }
    }
}
