//! The one place the CLI writes to stdout.
#![allow(clippy::print_stdout)]

use serde::Serialize;

/// Prints a value as pretty JSON.
pub fn json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => println!("{{\"ok\":false,\"error\":\"cannot render output: {e}\"}}"),
    }
}

/// Prints one line of text.
pub fn line(text: &str) {
    println!("{text}");
}
