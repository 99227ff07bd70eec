//! `canary init`: writes the commented starter config (`starter.yaml`, compiled in).
//!
//! The template is a file of its own so it reads as what the user gets, and a unit test
//! runs it through the same loader as `canary validate`, so a starter that does not
//! validate cannot ship.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

/// The starter config, exactly as `canary init` writes it.
pub const STARTER: &str = include_str!("starter.yaml");

#[derive(Args)]
pub struct InitArgs {
    /// Where to write the config (`-`: stdout).
    #[arg(short, long, default_value = "canary.yaml", value_name = "FILE")]
    output: PathBuf,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    force: bool,
}

pub fn main(a: InitArgs) -> ExitCode {
    if a.output.as_os_str() == "-" {
        outln!("{}", STARTER.trim_end());
        return ExitCode::SUCCESS;
    }
    match write(&a.output, a.force) {
        Ok(()) => {
            let f = a.output.display();
            outln!("wrote {f}: a starter config with one route, `web` (v1 stable, v2 canary)");
            outln!("next: edit the upstream addresses, then");
            outln!("  canary validate {f}");
            outln!("  canary serve --config {f}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("canary: {e}");
            ExitCode::FAILURE
        }
    }
}

/// After a config error: when the file does not exist at all, the next step is
/// `canary init`, not a fix of its content.
pub fn hint_if_missing(config: &Path) {
    if !config.exists() {
        errln!(
            "canary: {} does not exist: `canary init --output {}` writes a starter config",
            config.display(),
            config.display()
        );
    }
}

/// Writes the starter to `path`; without `force` an existing file is never touched
/// (`create_new`, so there is no window between the check and the write).
fn write(path: &Path, force: bool) -> Result<(), String> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let shown = path.display();
    let mut file = opts.open(path).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => format!(
            "{shown} already exists, left as it is: pass --force to overwrite it, \
             or --output FILE to write somewhere else"
        ),
        ErrorKind::NotFound => format!(
            "cannot create {shown}: the directory does not exist: create it first, \
             or choose another --output"
        ),
        _ => format!("cannot write {shown}: {e}: choose another --output"),
    })?;
    file.write_all(STARTER.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starter_config_validates_with_one_route_and_a_rollout() {
        let cfg = canary_config::parse("starter.yaml", STARTER)
            .unwrap_or_else(|e| panic!("the starter config does not validate:\n{e}"));
        assert_eq!(cfg.routes.len(), 1);
        let r = &cfg.routes[0];
        assert_eq!(r.route.name, "web");
        assert!(r.canary.is_some(), "the starter has a canary");
        assert!(r.rollout.is_some(), "the starter has a rollout");
    }

    #[test]
    fn init_never_overwrites_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("canary.yaml");
        std::fs::write(&p, "mine\n").unwrap();
        let err = write(&p, false).unwrap_err();
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "mine\n");
        write(&p, true).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), STARTER);
        let err = write(&dir.path().join("no/such/dir.yaml"), false).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }
}
