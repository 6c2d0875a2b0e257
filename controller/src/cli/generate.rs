//! `unidesk-controller generate man|completions`: the controller's man pages and shell
//! completion scripts, rendered from its clap definition by the agent crate's `manual`, the
//! one generator both binaries share. Hidden from `--help`; `scripts/package` runs it.

use clap::CommandFactory;
use unidesk_agent::manual::{self, GenerateCommand};

use super::{Cli, CliError, output};

/// Writes what `what` asks for and prints `{"written": [paths]}`; exit 2 when a file cannot
/// be written (the error names it).
pub(crate) fn run(what: &GenerateCommand) -> Result<(), CliError> {
    let written = manual::generate(Cli::command(), what).map_err(|e| CliError::Input(e.into()))?;
    output::json(&serde_json::json!({ "written": written }));
    Ok(())
}
