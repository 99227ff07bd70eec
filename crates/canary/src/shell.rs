//! `canary completions SHELL` and `canary man [VERB]`: generated from the clap
//! definitions (`clap_complete`, `clap_mangen`), so they never drift from the verbs.

use std::process::ExitCode;

use clap::{Command, ValueEnum};

/// The shells `canary completions` writes a script for.
#[derive(Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: Shell, mut cmd: Command) -> ExitCode {
    let mut buf = Vec::new();
    let name = cmd.get_name().to_string();
    match shell {
        Shell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, name, &mut buf)
        }
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, name, &mut buf),
        Shell::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, name, &mut buf)
        }
    }
    emit(&buf)
}

/// Writes the man page (roff) of `canary`, or of one verb as `canary-VERB(1)`, to stdout.
pub fn man(cmd: Command, verb: Option<&str>) -> ExitCode {
    let cmd = match verb {
        None => cmd,
        Some(v) => {
            // clap_mangen titles a page with the command's own name; a verb's page is
            // `canary-VERB`, as git and cargo name theirs.
            let Some(sub) = cmd.find_subcommand(v).cloned() else {
                let verbs: Vec<&str> = cmd
                    .get_subcommands()
                    .map(Command::get_name)
                    .filter(|n| *n != "help")
                    .collect();
                errln!(
                    "canary: no verb {v:?}: `canary man` documents every verb; one of {}",
                    verbs.join(", ")
                );
                return ExitCode::FAILURE;
            };
            let version = cmd.get_version().unwrap_or_default().to_string();
            // The version goes into the page's title only: `wait` has a `--version`
            // of its own, so no `--version` flag is generated for a verb.
            sub.name(format!("canary-{v}"))
                .version(version)
                .disable_version_flag(true)
        }
    };
    let main_page = verb.is_none();
    let mut buf = Vec::new();
    if let Err(e) = render(clap_mangen::Man::new(cmd), main_page, &mut buf) {
        errln!("canary: cannot render the man page: {e}");
        return ExitCode::FAILURE;
    }
    emit(&buf)
}

/// The main page's sections that clap does not know: written as roff here because
/// `--help`'s plain-text epilogue would be reflowed into one paragraph by `man`.
const MAIN_EXTRA: &str = r#".SH ENVIRONMENT
.TP
\fBCANARY_ADMIN\fR
Base URL of the admin API for the client verbs (default \fBhttp://127.0.0.1:9901\fR).
.TP
\fBCANARY_ADMIN_TOKEN\fR
The admin token the client verbs send as a bearer token.
.TP
\fBCANARY_LOG\fR
The log filter of \fBserve\fR (default \fBinfo\fR).
.TP
\fBNO_COLOR\fR
When set and not empty: no colour and no live line; plain lines only.
.SH EXIT STATUS
.TP
\fB0\fR
Success; for \fBwait\fR: the version waited for is promoted or stable.
.TP
\fB1\fR
\fBwait\fR: aborted, or the version will not be promoted; \fBserve\fR, \fBvalidate\fR, \fBinit\fR, \fBdemo\fR: failure.
.TP
\fB2\fR
\fBwait\fR: timed out.
.TP
\fB3\fR
Any other error of a client verb (unknown route, refused command, unreachable admin API, wrong token), or a usage error.
.SH FILES
.TP
\fIcanary.yaml\fR
The config file (\fBcanary init\fR writes a starter; \fBcanary validate\fR checks one).
.TP
\fIstate_dir\fR
Rollout state and the decision journal, one file each per route.
.SH EXAMPLES
.nf
canary init && canary validate canary.yaml
canary serve \-\-config canary.yaml
canary wait web \-\-version v2 \-\-timeout 20m
source <(canary completions bash)
.fi
.SH SEE ALSO
The documentation in the source tree: docs/cli.md, docs/config.md, docs/operations.md.
"#;

/// The whole page: clap's sections, and on the main page the ones above in place of
/// the `--help` epilogue.
fn render(man: clap_mangen::Man, main_page: bool, w: &mut Vec<u8>) -> std::io::Result<()> {
    if !main_page {
        return man.render(w);
    }
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    w.extend_from_slice(MAIN_EXTRA.as_bytes());
    man.render_version_section(w)
}

fn emit(buf: &[u8]) -> ExitCode {
    // Both generators write UTF-8 text; the output layer writes whole lines.
    outln!("{}", String::from_utf8_lossy(buf).trim_end());
    ExitCode::SUCCESS
}
