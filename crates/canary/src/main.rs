//! The `canary` binary: argument parsing, wiring and shutdown. No logic a test needs
//! lives here; it is in the library crates.

#[macro_use]
mod output;
mod cli;
mod demo;
mod fleet;
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
    /// Fleet mode: push the fleet's routes to etcd, show a member's view of the fleet.
    Fleet {
        #[command(subcommand)]
        cmd: fleet::FleetCmd,
    },
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
    let admin = matches!(args.command, Cmd::Admin(_) | Cmd::Fleet { .. });
    let code = match args.command {
        Cmd::Validate { config } => match canary_config::load(&config) {
            Ok(cfg) => {
                let n = cfg.routes.len();
                outln!(
                    "{}: ok ({n} route{})",
                    config.display(),
                    if n == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                errln!("{e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Serve { config } => serve::main(&config),
        Cmd::Demo(a) => demo::main(a),
        Cmd::Fleet { cmd } => fleet::main(cmd),
        Cmd::Admin(c) => cli::main(c),
    };
    if output::failed() {
        // The output was not delivered: an error of the verb (3 for the admin verbs, as
        // for any other error; 1 for `validate`, `serve` and `demo`).
        return if admin {
            ExitCode::from(cli::EXIT_ERROR)
        } else {
            ExitCode::FAILURE
        };
    }
    code
}
