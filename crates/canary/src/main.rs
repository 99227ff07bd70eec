//! The `canary` binary: argument parsing, wiring and shutdown. No logic a test needs
//! lives here; it is in the library crates.

#[macro_use]
mod output;
mod cli;
mod demo;
mod handover;
mod hint;
mod init;
mod serve;
mod shell;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Optional (`--features mimalloc`): fewer instructions per request than glibc malloc,
/// but a larger resident set; see docs/performance.md.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Canary releases in one binary: a reverse proxy in front of your stable and canary
/// versions, and the controller that moves traffic between them.
#[derive(Parser)]
#[command(name = "canary", version, about, after_long_help = AFTER_HELP)]
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
        /// Take the listening sockets over from the `canary serve` running with the
        /// same `state_dir`, which then drains and exits: a restart or upgrade that
        /// refuses no connection (docs/operations.md, "Zero-downtime restart").
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file without starting anything; exits non-zero with
    /// file:line:column and the reason for every problem.
    Validate {
        /// The config file.
        config: PathBuf,
    },
    /// A self-contained demo: built-in v1/v2 upstreams, synthetic traffic and a
    /// whole rollout in about 35 s; then it serves until Ctrl-C (or `--exit`).
    Demo(demo::DemoArgs),
    /// Write a commented starter config (one route, stable and canary, a rollout)
    /// that passes `canary validate` as written; never overwrites without --force.
    Init(init::InitArgs),
    /// Print a shell completion script to stdout, e.g.
    /// `source <(canary completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: shell::Shell,
    },
    /// Print the man page (roff) to stdout: `canary man | man -l -`.
    Man {
        /// A verb's own page (`canary-VERB(1)`) instead of the main one.
        verb: Option<String>,
    },
    #[command(flatten)]
    Admin(cli::AdminCmd),
}

/// The end of `canary --help` and of the man page.
const AFTER_HELP: &str = "\
Environment:
  CANARY_ADMIN        base URL of the admin API for the client verbs (default http://127.0.0.1:9901)
  CANARY_ADMIN_TOKEN  the admin token the client verbs send as a bearer token
  CANARY_LOG          log filter of `serve` (default info)
  NO_COLOR            when set and not empty: no colour and no live line, plain lines only

Exit codes: 0 success; 1 `wait`: aborted or not promoted, `serve`/`validate`/`init`: failure;
2 `wait`: timed out; 3 any other error of a client verb, or a usage error.

Start with `canary init`, then `canary validate canary.yaml` and `canary serve`.
Documentation: docs/cli.md, docs/config.md, docs/operations.md.";

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
    let admin = matches!(args.command, Cmd::Admin(_));
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
                init::hint_if_missing(&config);
                ExitCode::FAILURE
            }
        },
        Cmd::Serve { config, takeover } => serve::main(&config, takeover),
        Cmd::Demo(a) => demo::main(a),
        Cmd::Init(a) => init::main(a),
        Cmd::Completions { shell } => shell::completions(shell, Args::command()),
        Cmd::Man { verb } => shell::man(Args::command(), verb.as_deref()),
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
