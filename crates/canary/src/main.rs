//! The `canary` binary: argument parsing, wiring and shutdown. No logic a test needs
//! lives here; it is in the library crates.

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod cli;
mod demo;
mod fleet;
mod handover;
mod hint;
mod https;
mod init;
mod redirect;
mod serve;
mod shell;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// jemalloc (the default feature `jemalloc`): memory freed when connections go idle or
/// close is given back to the system; its settings are built in from
/// `.cargo/config.toml`; see docs/performance.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Fleet mode: push the fleet's routes to etcd, show a member's view of the fleet.
    Fleet {
        #[command(subcommand)]
        cmd: fleet::FleetCmd,
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
                print_tls(&cfg);
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

/// `canary validate`'s lines about TLS: each served certificate with its names and
/// expiry, and a warning for every pool that does not verify its upstreams.
fn print_tls(cfg: &canary_config::Config) {
    let now = std::time::SystemTime::now();
    for (key, tls) in [("tls", &cfg.tls), ("admin_tls", &cfg.admin_tls)] {
        for (i, c) in tls.iter().flat_map(|t| t.certificates.iter().enumerate()) {
            let days = c
                .not_after
                .duration_since(now)
                .map_or(0, |d| d.as_secs() / 86_400);
            let names = if c.names.is_empty() {
                "(no DNS names)".to_string()
            } else {
                c.names.join(", ")
            };
            outln!(
                "{key}.certificates[{i}] {}: {names}; expires {} (in {days} days)",
                c.files.cert.display(),
                httpdate::fmt_http_date(c.not_after),
            );
        }
    }
    for r in &cfg.routes {
        for (which, pool) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
            if pool
                .and_then(|p| p.tls.as_ref())
                .is_some_and(|t| t.insecure_skip_verify)
            {
                errln!(
                    "warning: route {} {which}: tls.insecure_skip_verify is on; the upstreams' \
                     certificates are NOT verified",
                    r.route.name
                );
            }
        }
    }
}
