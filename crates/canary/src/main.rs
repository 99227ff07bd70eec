//! The `canary` binary: argument parsing, wiring and shutdown. No logic a test needs
//! lives here; it is in the library crates.

mod cli;
mod demo;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Optional (`--features mimalloc`): fewer instructions per request than glibc malloc,
/// but a larger resident set; see docs/performance.md.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Canary releases in one binary: a reverse proxy in front of your stable and canary
/// versions, and the controller that moves traffic between them.
#[derive(Parser)]
#[command(name = "canary", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy and the rollout controller.
    Serve {
        /// The config file (YAML); reloaded on change and on SIGHUP.
        #[arg(short, long, default_value = "canary.yaml")]
        config: PathBuf,
    },
    /// Validate a config file without starting anything; exits non-zero with
    /// file:line:column and the reason for every problem.
    Validate {
        /// The config file.
        config: PathBuf,
    },
    /// A self-contained demo: built-in v1/v2 upstreams, synthetic traffic and a
    /// whole rollout in about a minute.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Admin(cli::AdminCmd),
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // `--help` and `--version` print to stdout and succeed. A usage error exits
            // 3, not clap's 2, which `wait` reports as "timed out" (docs/cli.md).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(cli::EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match args.command {
        Cmd::Validate { config } => match canary_config::load(&config) {
            Ok(cfg) => {
                let n = cfg.routes.len();
                println!(
                    "{}: ok ({n} route{})",
                    config.display(),
                    if n == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Serve { config } => serve::main(&config),
        Cmd::Demo(a) => demo::main(a),
        Cmd::Admin(c) => cli::main(c),
    }
}
