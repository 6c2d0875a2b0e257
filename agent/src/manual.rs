//! The manual of every binary: man pages and shell completion scripts generated from its clap
//! definition, so what the packages install cannot drift from the command line. Both binaries
//! expose it as the hidden `generate` verb (`scripts/package` runs it at package time).
//!
//! Rendering is pure (a clap `Command` in, file names and bytes out); only [`write`] touches
//! the disk, through [`crate::atomic`]. Nothing here reads configuration or the environment.

use std::path::{Path, PathBuf};

/// `generate`: which documentation to write, and where.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum GenerateCommand {
    /// Man pages (section 1): one for the command and one per visible subcommand, named
    /// `<binary>.1`, `<binary>-<verb>.1`, `<binary>-<verb>-<subverb>.1`.
    Man {
        /// Directory to write into (created when missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// A completion script for one shell: `<binary>.bash`, `_<binary>` (zsh),
    /// `<binary>.fish`, `<binary>.elv`, `_<binary>.ps1`.
    Completions {
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// Directory to write into (created when missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Documentation that could not be rendered or written.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("cannot render the man page {page}: {source}")]
    Render {
        page: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the output directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One generated file: its name in the output directory and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub file_name: String,
    pub bytes: Vec<u8>,
}

/// Renders the man pages of `cmd` and of every subcommand that is not hidden (the `generate`
/// verb itself is hidden, so it documents nothing about itself).
pub fn man_pages(cmd: clap::Command) -> Result<Vec<Page>, ManualError> {
    fn walk(cmd: &clap::Command, pages: &mut Vec<Page>) -> Result<(), ManualError> {
        let man = clap_mangen::Man::new(cmd.clone());
        let file_name = man.get_filename();
        let mut bytes = Vec::new();
        man.render(&mut bytes)
            .map_err(|source| ManualError::Render {
                page: file_name.clone(),
                source,
            })?;
        pages.push(Page { file_name, bytes });
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, pages)?;
        }
        Ok(())
    }
    // Built once, so each subcommand carries its full display name (`unidesk-agent-run`).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    walk(&cmd, &mut pages)?;
    Ok(pages)
}

/// Renders the completion script of `cmd` for `shell`.
pub fn completion(mut cmd: clap::Command, shell: clap_complete::Shell) -> Page {
    use clap_complete::Generator;
    let name = cmd.get_name().to_owned();
    let mut bytes = Vec::new();
    clap_complete::generate(shell, &mut cmd, name.clone(), &mut bytes);
    Page {
        file_name: shell.file_name(&name),
        bytes,
    }
}

/// Renders what `what` asks for from `cmd` and writes it; returns the paths written.
pub fn generate(cmd: clap::Command, what: &GenerateCommand) -> Result<Vec<PathBuf>, ManualError> {
    let (pages, out) = match what {
        GenerateCommand::Man { out } => (man_pages(cmd)?, out),
        GenerateCommand::Completions { shell, out } => (vec![completion(cmd, *shell)], out),
    };
    write(&pages, out)
}

/// Writes each page into `dir` (created when missing), atomically, mode 0644.
pub fn write(pages: &[Page], dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    std::fs::create_dir_all(dir).map_err(|source| ManualError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    pages
        .iter()
        .map(|page| {
            let path = dir.join(&page.file_name);
            crate::atomic::write_file(&path, &page.bytes, 0o644)
                .map_err(|source| ManualError::Write {
                    path: path.clone(),
                    source,
                })
                .map(|()| path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn sample() -> Command {
        Command::new("tool")
            .about("A sample tool")
            .after_help("EXAMPLES:\n  tool run --config /etc/tool.toml")
            .subcommand(
                Command::new("run")
                    .about("Run it")
                    .arg(Arg::new("config").long("config")),
            )
            .subcommand(
                Command::new("job")
                    .about("Jobs")
                    .subcommand(Command::new("list").about("Every job")),
            )
            .subcommand(Command::new("generate").hide(true))
    }

    #[test]
    fn a_page_per_visible_command_and_none_for_hidden_ones() {
        let pages = man_pages(sample()).unwrap();
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(
            names,
            ["tool.1", "tool-run.1", "tool-job.1", "tool-job-list.1"]
        );
        let top = String::from_utf8(pages[0].bytes.clone()).unwrap();
        assert!(top.contains(".TH tool 1"), "{top}");
        assert!(
            top.contains("tool run \\-\\-config /etc/tool.toml"),
            "{top}"
        );
        let run = String::from_utf8(pages[1].bytes.clone()).unwrap();
        assert!(run.contains("\\-\\-config"), "{run}");
    }

    #[test]
    fn completions_are_named_as_each_shell_looks_them_up() {
        let bash = completion(sample(), clap_complete::Shell::Bash);
        assert_eq!(bash.file_name, "tool.bash");
        let text = String::from_utf8(bash.bytes).unwrap();
        assert!(text.contains("complete -F _tool"), "{text}");
        assert!(text.contains("--config"), "{text}");
        assert_eq!(
            completion(sample(), clap_complete::Shell::Zsh).file_name,
            "_tool"
        );
        assert_eq!(
            completion(sample(), clap_complete::Shell::Fish).file_name,
            "tool.fish"
        );
    }

    #[test]
    fn generate_writes_the_pages_into_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man");
        let written = generate(sample(), &GenerateCommand::Man { out: out.clone() }).unwrap();
        assert_eq!(written.len(), 4);
        assert!(out.join("tool-job-list.1").is_file());
    }

    #[test]
    fn an_output_path_that_is_a_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = generate(
            sample(),
            &GenerateCommand::Completions {
                shell: clap_complete::Shell::Bash,
                out: file.clone(),
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }
}
