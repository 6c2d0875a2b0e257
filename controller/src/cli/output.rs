//! The one place the CLI writes to stdout. Each verb hands it a value; the format chosen with
//! `--output` decides how it looks: `json` (pretty JSON, the default, what scripts and the
//! tests parse — its bytes do not depend on the format flag's existence) or `text` (aligned
//! `key: value` lines and tables for a person). Colour is used only for text on a terminal,
//! and never when `NO_COLOR` is set.
//!
//! Rendering is a pure function of the value ([`render_text`]); only [`print`] and [`line`]
//! write.
#![allow(clippy::print_stdout)]

use std::io::IsTerminal;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::Value;

/// How values are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Pretty JSON (the default; deploy, job and ci verbs are parsed by scripts).
    #[default]
    Json,
    /// Lines and tables for a person.
    Text,
}

static FORMAT: OnceLock<Format> = OnceLock::new();
static NO_COLOR: OnceLock<bool> = OnceLock::new();

/// Chooses the format for the rest of the process; the first call wins.
pub fn set_format(format: Format) {
    let _ = FORMAT.set(format);
}

/// The format in force (JSON unless `--output text` was given).
pub fn format() -> Format {
    FORMAT.get().copied().unwrap_or_default()
}

/// Records that `NO_COLOR` was set (only `main` reads the environment).
pub fn set_no_color(no_color: bool) {
    let _ = NO_COLOR.set(no_color);
}

/// Whether text output is coloured: stdout is a terminal and `NO_COLOR` is not set.
fn colour() -> bool {
    !NO_COLOR.get().copied().unwrap_or(false) && std::io::stdout().is_terminal()
}

/// Prints a value in the chosen format. JSON is written straight from the value, so its
/// bytes (and key order) are what they were before `--output` existed.
pub fn print(value: &impl Serialize) {
    let fail = |e: serde_json::Error| {
        println!("{{\"ok\":false,\"error\":\"cannot render output: {e}\"}}");
    };
    match format() {
        Format::Json => match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(e) => fail(e),
        },
        Format::Text => match serde_json::to_value(value) {
            Ok(v) => print!("{}", render_text(&v, colour())),
            Err(e) => fail(e),
        },
    }
}

/// Prints a value in the chosen format (the name verbs written before `--output` use).
pub fn json(value: &impl Serialize) {
    print(value);
}

/// Whether progress goes to stderr while a verb waits: only when stderr is a terminal, so
/// scripts and the tests read exactly what they did before.
pub fn progress_enabled() -> bool {
    std::io::stderr().is_terminal()
}

/// Whether a bar is drawn on the current stderr line (a line must first end it).
static BAR_OPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One progress line on stderr (callers ask [`progress_enabled`] first).
pub fn progress(text: &str) {
    if BAR_OPEN.swap(false, std::sync::atomic::Ordering::Relaxed) {
        eprintln!();
    }
    eprintln!("{text}");
}

/// A progress bar on stderr, redrawn in place until the next [`progress`] line.
pub fn progress_bar(text: &str) {
    BAR_OPEN.store(true, std::sync::atomic::Ordering::Relaxed);
    eprint!("\r\x1b[K{text}");
}

/// Prints one line of text, whatever the format (logs are text in both).
pub fn line(text: &str) {
    println!("{text}");
}

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// A scalar as a person reads it: strings bare, `null` as `-`.
fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// The colour a value gets under `key`, if any: outcomes green or red.
fn tint(key: &str, value: &Value) -> Option<&'static str> {
    match (key, value) {
        ("ok", Value::Bool(true)) => Some(GREEN),
        ("ok", Value::Bool(false)) => Some(RED),
        ("status" | "jobStatus" | "ciStatus", Value::String(s)) => match s.as_str() {
            "succeeded" | "noop" => Some(GREEN),
            "failed" | "cancelled" | "timed-out" | "interrupted" | "timeout"
            | "isolation-violated" => Some(RED),
            _ => None,
        },
        _ => None,
    }
}

fn paint(text: &str, colour: Option<&str>, enabled: bool) -> String {
    match colour {
        Some(c) if enabled => format!("{c}{text}{RESET}"),
        _ => text.to_string(),
    }
}

/// Keys in reading order: the outcome first, then what the thing is, then the rest as they
/// come (alphabetical for `json!` objects, which serde_json keeps sorted).
fn ordered(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let rank = |key: &str| match key {
        "ok" => 0,
        "id" | "name" | "agent" | "jobId" | "runId" => 1,
        "status" | "kind" => 2,
        _ => 3,
    };
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by_key(|(k, _)| rank(k));
    entries
}

fn is_scalar(value: &Value) -> bool {
    !matches!(value, Value::Object(_) | Value::Array(_))
}

/// Renders a value as text: an object as aligned `key: value` lines (nested objects
/// indented), an array of objects as a table, other arrays as comma-separated lists,
/// multi-line strings as indented blocks. Ends with a newline.
pub fn render_text(value: &Value, colour: bool) -> String {
    let mut out = String::new();
    render(value, 0, colour, &mut out);
    out
}

fn render(value: &Value, indent: usize, colour: bool, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0);
            for (key, v) in ordered(map) {
                match v {
                    Value::Object(inner) if !inner.is_empty() => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        render(v, indent + 2, colour, out);
                    }
                    Value::Array(items) if items.iter().any(|i| !is_scalar(i)) => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        render(v, indent + 2, colour, out);
                    }
                    Value::String(s) if s.contains('\n') => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        for l in s.lines() {
                            out.push_str(&format!("{pad}  {l}\n"));
                        }
                    }
                    _ => {
                        let text = match v {
                            Value::Array(items) if items.is_empty() => "-".to_string(),
                            Value::Array(items) => {
                                items.iter().map(scalar).collect::<Vec<_>>().join(", ")
                            }
                            Value::Object(_) => "-".to_string(),
                            other => scalar(other),
                        };
                        out.push_str(&format!(
                            "{pad}{key:<width$}  {}\n",
                            paint(&text, tint(key, v), colour),
                            key = format!("{key}:"),
                            width = width + 1
                        ));
                    }
                }
            }
        }
        Value::Array(items) if items.is_empty() => out.push_str(&format!("{pad}(none)\n")),
        Value::Array(items) if items.iter().all(Value::is_object) => {
            table(items, indent, colour, out)
        }
        Value::Array(items) => {
            for item in items {
                if is_scalar(item) {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                } else {
                    out.push_str(&format!("{pad}-\n"));
                    render(item, indent + 2, colour, out);
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// An array of objects as a table: one column per key (in order of first appearance), nested
/// values as compact JSON.
fn table(rows: &[Value], indent: usize, colour: bool, out: &mut String) {
    let pad = " ".repeat(indent);
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        if let Value::Object(map) = row {
            for (key, _) in ordered(map) {
                if !columns.contains(&key.as_str()) {
                    columns.push(key);
                }
            }
        }
    }
    let cells: Vec<Vec<(String, Option<&str>)>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| {
                    let v = row.get(*c).unwrap_or(&Value::Null);
                    let text = if is_scalar(v) {
                        scalar(v)
                    } else {
                        v.to_string()
                    };
                    // One line per row: a multi-line cell shows its first line.
                    let text = text.lines().next().unwrap_or_default().to_string();
                    (text, tint(c, v))
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].0.chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let last = columns.len().saturating_sub(1);
    let header: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let cell = if i == last {
                c.to_string()
            } else {
                format!("{c:<w$}", w = widths[i])
            };
            paint(&cell, Some(BOLD), colour)
        })
        .collect();
    out.push_str(&format!("{pad}{}\n", header.join("  ")));
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, (text, tint))| {
                let cell = if i == last {
                    text.clone()
                } else {
                    format!("{text:<w$}", w = widths[i])
                };
                paint(&cell, *tint, colour)
            })
            .collect();
        out.push_str(&format!("{pad}{}\n", line.join("  ").trim_end()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_are_aligned_lines_and_arrays_of_objects_tables() {
        let value = json!({
            "ok": false,
            "config": "/etc/unidesk/controller.toml",
            "checks": [
                {"name": "tls", "ok": true, "detail": "certificate and key match"},
                {"name": "state-dir", "ok": false, "detail": "cannot write /var/lib/x"},
            ],
            "next": ["a", "b"],
            "job": {"jobId": "job-1", "result": null},
        });
        let text = render_text(&value, false);
        assert_eq!(
            text,
            "ok:      false\n\
             checks:\n  \
               ok     name       detail\n  \
               true   tls        certificate and key match\n  \
               false  state-dir  cannot write /var/lib/x\n\
             config:  /etc/unidesk/controller.toml\n\
             job:\n  \
               jobId:   job-1\n  \
               result:  -\n\
             next:    a, b\n"
        );
    }

    #[test]
    fn colour_marks_outcomes_only_when_enabled() {
        let value = json!({"ok": true, "status": "failed", "kind": "deploy"});
        let plain = render_text(&value, false);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let coloured = render_text(&value, true);
        assert!(coloured.contains("\x1b[32mtrue\x1b[0m"), "{coloured:?}");
        assert!(coloured.contains("\x1b[31mfailed\x1b[0m"), "{coloured:?}");
        assert!(coloured.contains("kind:    deploy\n"), "{coloured:?}");
    }

    #[test]
    fn multi_line_strings_and_empty_lists_stay_readable() {
        let value = json!({"logTail": "one\ntwo", "violations": [], "rows": []});
        assert_eq!(
            render_text(&value, false),
            "logTail:\n  one\n  two\nrows:        -\nviolations:  -\n"
        );
        assert_eq!(render_text(&json!([]), false), "(none)\n");
        assert_eq!(render_text(&json!(["x", 2]), false), "- x\n- 2\n");
    }
}
