//! `hubnat generate`: man pages and shell completions made from the CLI's own definitions, so
//! that they say what `--help` says. tools/install.sh installs what it writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

#[derive(Subcommand)]
pub enum What {
    /// A man page (section 1) for hubnat and one for each subcommand (hubnat-run.1, ...) in
    /// DIR; prints the files written.
    Man { dir: PathBuf },
    /// The completion script for SHELL in DIR (bash: hubnat.bash, zsh: _hubnat, fish:
    /// hubnat.fish, ...); prints the file written.
    Completions { shell: Shell, dir: PathBuf },
}

pub fn main(what: What) -> Result<()> {
    // Without clap's own `help` subcommand: `--help` says the same, and a page or completion
    // for it would only add noise.
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    cmd.build();
    match what {
        What::Man { dir } => {
            make_dir(&dir)?;
            for page in man_pages(&cmd, &dir)? {
                println!("{}", page.display());
            }
        }
        What::Completions { shell, dir } => {
            make_dir(&dir)?;
            let file =
                clap_complete::generate_to(shell, &mut cmd, "hubnat", &dir).with_context(|| {
                    format!("cannot write {shell} completions in {}", dir.display())
                })?;
            println!("{}", file.display());
        }
    }
    Ok(())
}

fn make_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))
}

/// Writes the page of `cmd` and of each of its subcommands, depth first; their paths.
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let page = clap_mangen::Man::new(cmd.clone()).manual("hubnat");
    written.push(
        page.generate_to(dir).with_context(|| {
            format!("cannot write {} in {}", page.get_filename(), dir.display())
        })?,
    );
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.extend(man_pages(sub, dir)?);
    }
    Ok(written)
}
