//! Subcommands for hubnat's own use, outside the CLI users see (its `--help`, man pages and
//! completions): `hubnat demo-helper ...`, what `hubnat demo` runs inside its namespaces, and
//! `hubnat generate ...`, the man pages and completions tools/install.sh installs.

use std::ffi::OsString;

use clap::Parser;

use crate::{demo, generate};

#[derive(Parser)]
#[command(name = "hubnat")]
enum Internal {
    DemoHelper {
        #[command(subcommand)]
        op: demo::Helper,
    },
    Generate {
        #[command(subcommand)]
        what: generate::What,
    },
}

/// Runs an internal subcommand when `argv` names one; its exit status.
pub fn dispatch(argv: &[OsString]) -> Option<i32> {
    let first = argv.get(1)?.to_str()?;
    if !matches!(first, "demo-helper" | "generate") {
        return None;
    }
    let result = match Internal::parse_from(argv) {
        Internal::DemoHelper { op } => demo::helper(op),
        Internal::Generate { what } => generate::main(what),
    };
    Some(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hubnat {first}: {e:#}");
            1
        }
    })
}
