//! A benchmark's output: the machine and commit it ran on, a markdown table for people and
//! a JSON file (`target/bench/<name>.json`) for tools.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

/// Where a benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    /// UTC time the run started, RFC 3339.
    pub date: String,
    /// Short commit id of the workspace's HEAD, or a note when there is none.
    pub commit: String,
    /// Whether tracked files differ from that commit.
    pub dirty: bool,
}

impl Machine {
    /// Reads the machine's facts from `/proc` and the commit from the workspace's Git
    /// repository; a fact that cannot be read is reported as `unknown`.
    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| "unknown".into());
        let (commit, dirty) = commit_of(Path::new(env!("CARGO_MANIFEST_DIR")));
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu,
            kernel,
            date,
            commit,
            dirty,
        }
    }

    /// One line for the top of a report.
    pub fn line(&self) -> String {
        format!(
            "{} cores ({}), Linux {}, {}, commit {}{}",
            self.cores,
            self.cpu,
            self.kernel,
            self.date,
            self.commit,
            if self.dirty {
                " (with local changes)"
            } else {
                ""
            }
        )
    }
}

/// The short id of HEAD of the repository holding `dir`, and whether tracked files changed.
fn commit_of(dir: &Path) -> (String, bool) {
    let Ok(repo) = git2::Repository::discover(dir) else {
        return ("unknown (no Git repository)".into(), false);
    };
    let commit = match repo.head().and_then(|h| h.peel_to_commit()) {
        Ok(c) => c.id().to_string().chars().take(7).collect(),
        Err(_) => "none (no commit yet)".into(),
    };
    let mut options = git2::StatusOptions::new();
    options.include_untracked(false).include_ignored(false);
    let dirty = repo
        .statuses(Some(&mut options))
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    (commit, dirty)
}

/// A markdown table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are left empty.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as GitHub-flavoured markdown.
    pub fn render(&self) -> String {
        let line = |cells: &[String]| {
            let mut out = String::from("|");
            for i in 0..self.headers.len() {
                out.push(' ');
                out.push_str(cells.get(i).map_or("", String::as_str));
                out.push_str(" |");
            }
            out.push('\n');
            out
        };
        let mut out = line(&self.headers);
        out.push('|');
        for _ in &self.headers {
            out.push_str(" --- |");
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// Writes `value` as pretty JSON to `<target>/bench/<name>.json` and returns the path.
pub fn write_json(target: &Path, name: &str, value: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    let mut text = serde_json::to_string_pretty(value).context("encoding the report")?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Prints report text on stdout: the one place the benchmarks write there.
#[allow(clippy::print_stdout)]
pub fn print(text: &str) {
    println!("{text}");
}

/// `bytes / seconds` in decimal megabytes per second.
pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    bytes as f64 / seconds / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_renders_markdown() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["1".into()]);
        assert_eq!(t.render(), "| a | b |\n| --- | --- |\n| 1 |  |\n");
    }

    #[test]
    fn throughput_in_decimal_megabytes() {
        assert_eq!(mb_per_s(2_000_000, 0.5), 4.0);
        assert_eq!(mb_per_s(1, 0.0), 0.0);
    }
}
