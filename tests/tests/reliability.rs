//! `docs/RELIABILITY.md` is the table of every fault, bad input and security case and the test
//! that checks it. This keeps it honest: every row names a test that exists, there are at
//! least 40 distinct cases, and every test of the cross-process suites has a row.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The cross-process suites whose every test must be in the table.
const SUITES: &[&str] = &[
    "tests/tests/transport.rs",
    "tests/tests/deploy.rs",
    "tests/tests/environments.rs",
    "tests/tests/k3s_deploy.rs",
    "tests/tests/k3s_import.rs",
    "tests/tests/kube_apply.rs",
    "tests/tests/ci.rs",
    "tests/tests/faults.rs",
    "tests/tests/security.rs",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

/// `(file, function)` of every backticked `file::function` in the table's rows.
fn rows(table: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| ")) {
        let case = line
            .split('|')
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string();
        for part in line.split('`').skip(1).step_by(2) {
            if let Some((file, function)) = part.rsplit_once("::")
                && file.ends_with(".rs")
            {
                found.push((case.clone(), file.to_string(), function.to_string()));
            }
        }
    }
    found
}

/// Names of the `#[test]` functions of a source file.
fn tests_in(source: &str) -> Vec<String> {
    let lines: Vec<&str> = source.lines().collect();
    let mut names = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.trim_start().starts_with("#[test]")
            && !line.trim_start().starts_with("#[tokio::test")
        {
            continue;
        }
        for next in lines.iter().skip(i + 1).take(4) {
            let t = next.trim_start();
            let t = t.strip_prefix("async ").unwrap_or(t);
            if let Some(rest) = t.strip_prefix("fn ") {
                names.push(rest.split('(').next().unwrap_or_default().to_string());
                break;
            }
        }
    }
    names
}

#[test]
fn every_row_names_a_real_test_and_every_suite_test_has_a_row() {
    let root = root();
    let table = std::fs::read_to_string(root.join("docs/RELIABILITY.md"))
        .expect("docs/RELIABILITY.md exists");
    let rows = rows(&table);
    let mut missing = Vec::new();
    for (case, file, function) in &rows {
        let source = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        if !tests_in(&source).contains(function) {
            missing.push(format!("{case}: {file}::{function}"));
        }
    }
    assert!(
        missing.is_empty(),
        "rows of docs/RELIABILITY.md name tests that do not exist: {missing:#?}"
    );
    let cases: BTreeSet<&str> = rows.iter().map(|(c, _, _)| c.as_str()).collect();
    assert!(
        cases.len() >= 40,
        "docs/RELIABILITY.md has {} cases, at least 40 are required",
        cases.len()
    );
    let listed: BTreeSet<(String, String)> = rows
        .iter()
        .map(|(_, f, n)| (f.clone(), n.clone()))
        .collect();
    let mut unlisted = Vec::new();
    for suite in SUITES {
        let source = std::fs::read_to_string(root.join(suite)).expect("suite file exists");
        for name in tests_in(&source) {
            if !listed.contains(&(suite.to_string(), name.clone())) {
                unlisted.push(format!("{suite}::{name}"));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "tests without a row in docs/RELIABILITY.md: {unlisted:#?}"
    );
}

#[test]
fn the_checker_sees_rows_and_tests() {
    let table =
        "| F1 | cut | holds | `a.rs::one` |\n| B1 | x | y | `b.rs::two` and `c.rs::three` |\n";
    let rows = rows(table);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2], ("B1".into(), "c.rs".into(), "three".into()));
    let source = "#[test]\nfn one() {}\n#[tokio::test]\nasync fn two() {}\nfn helper() {}\n";
    assert_eq!(tests_in(source), ["one", "two"]);
}
