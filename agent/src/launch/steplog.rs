//! The log of one step as the step's code sees it: plain lines and the seed's `key=value`
//! decision lines. Lines go through a bounded channel to the launch executor, which numbers
//! them as events, writes them to the run directory and sends them; a full channel makes the
//! step wait, so a slow controller slows the step instead of growing memory.

use tokio::sync::mpsc;
use unidesk_protocol::Step;

/// A line a step wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLine {
    pub step: Step,
    pub line: String,
}

/// Where a step writes its lines. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StepLog {
    step: Step,
    tx: mpsc::Sender<StepLine>,
}

/// The longest line kept; longer lines are cut and marked, so one runaway line cannot make a
/// frame too large.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

impl StepLog {
    /// A log for `step` and the receiving end, holding at most `capacity` lines in flight.
    pub fn channel(step: Step, capacity: usize) -> (StepLog, mpsc::Receiver<StepLine>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (StepLog { step, tx }, rx)
    }

    /// The same sink for another step.
    pub fn for_step(&self, step: Step) -> StepLog {
        StepLog {
            step,
            tx: self.tx.clone(),
        }
    }

    /// The step this log belongs to.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Writes one line (trailing newlines removed, cut at [`MAX_LINE_BYTES`]).
    pub async fn line(&self, line: impl Into<String>) {
        let line = shape(line.into());
        tracing::debug!(step = self.step.name(), "{line}");
        // A closed receiver means the launch is being torn down; the line has nowhere to go.
        let _ = self
            .tx
            .send(StepLine {
                step: self.step,
                line,
            })
            .await;
    }

    /// Writes one line from blocking code (a git2 callback, a tar writer). Must not be called
    /// from async code.
    pub fn blocking_line(&self, line: impl Into<String>) {
        let line = shape(line.into());
        tracing::debug!(step = self.step.name(), "{line}");
        let _ = self.tx.blocking_send(StepLine {
            step: self.step,
            line,
        });
    }

    /// Writes a decision line `key=value` (part of the seed's log contract) and the same
    /// decision as a tracing event.
    pub async fn decision(&self, key: &str, value: &str) {
        tracing::info!(
            step = self.step.name(),
            decision = key,
            value,
            "{key}={value}"
        );
        self.line(format!("{key}={value}")).await;
    }
}

/// Removes trailing newlines and cuts a line at [`MAX_LINE_BYTES`].
fn shape(mut line: String) -> String {
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    if line.len() > MAX_LINE_BYTES {
        let mut cut = MAX_LINE_BYTES;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" …[line cut]");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn decisions_are_exact_key_value_lines() {
        let (log, mut rx) = StepLog::channel(Step::Build, 4);
        log.decision("target_build_proxy_probe", "ok").await;
        log.line("a\n").await;
        assert_eq!(rx.recv().await.unwrap().line, "target_build_proxy_probe=ok");
        assert_eq!(rx.recv().await.unwrap().line, "a");
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let (log, mut rx) = StepLog::channel(Step::Build, 4);
        log.line("é".repeat(MAX_LINE_BYTES)).await;
        let got = rx.recv().await.unwrap().line;
        assert!(got.len() <= MAX_LINE_BYTES + 20);
        assert!(got.ends_with("[line cut]"));
    }
}
