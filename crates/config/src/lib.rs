//! YAML config file → validated [`Config`] made of core types.
//!
//! Three stages, as in vector and linkerd: raw serde structs with source spans
//! (`raw`), `validate` that collects *every* error with its file:line:column, and the
//! validated [`model`] the rest of the program uses. Only this crate knows the file
//! format. Loading never binds ports or touches the network; `canary validate` and a
//! reload run exactly the same code.
//!
//! # Layout
//!
//! - [`parse`] / [`load`]: text or file → [`Config`] or a [`ConfigError`] listing every
//!   problem as `file:line:column: message`.
//! - [`parse_document`]: a fleet document (routes only) → its routes, same checks.
//! - [`diff`]: what changed between two configs, for the reload log line.
//! - [`model`]: the validated types.
//! - `raw` (private): the file's shape, every value with its location.
//! - `validate` (private): raw → model, one diagnostic per problem.
//! - `syntax` (private): the grammar of names, hosts, upstreams and networks.
//!
//! The format itself is documented in `docs/config.md`.

#![forbid(unsafe_code)]

mod diff;
mod error;
pub mod model;
mod raw;
mod syntax;
mod validate;

use std::path::Path;

use serde_saphyr::{MessageFormatter, Spanned, UserMessageFormatter};

pub use diff::diff;
pub use error::{ConfigError, Diagnostic};
pub use model::*;

/// Parses and validates config text. `source_name` (usually the file path) is what
/// diagnostics show as their file.
///
/// A YAML syntax or type error stops parsing, so it is reported alone; otherwise every
/// validation problem in the file is reported.
pub fn parse(source_name: &str, text: &str) -> Result<Config, ConfigError> {
    let root: Spanned<raw::RawConfig> =
        serde_saphyr::from_str(text).map_err(|e| yaml_error(source_name, &e))?;
    validate::validate(source_name, root)
}

/// Parses and validates a fleet document: the `routes` list that `canary fleet push`
/// writes to `<prefix>/config` and every member applies. Process settings (`listen`,
/// `admin`, `state_dir`, `fleet`, ...) are refused: they stay in each member's own file.
/// `source_name` is what diagnostics show as their file (e.g. `etcd:/p/config@42`).
pub fn parse_document(source_name: &str, text: &str) -> Result<Vec<RouteConfig>, ConfigError> {
    let root: Spanned<raw::RawConfig> =
        serde_saphyr::from_str(text).map_err(|e| yaml_error(source_name, &e))?;
    validate::validate_document(source_name, root)
}

/// Reads and validates a config file. An unreadable file is a [`ConfigError`] at
/// line 0, column 0.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::single(&name, 0, 0, format!("cannot read the config file: {e}"))
    })?;
    parse(&name, &text)
}

/// One diagnostic from a serde-saphyr error: its location and its bare message (the
/// error's `Display` adds a multi-line source snippet, which we do not want in a
/// `file:line:column: message` line).
fn yaml_error(file: &str, e: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    if let serde_saphyr::Error::Budget { breach, .. } = e.without_snippet() {
        return ConfigError::single(file, line, column, budget_text(breach));
    }
    let message = UserMessageFormatter.format_message(e.without_snippet());
    let message: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    ConfigError::single(file, line, column, friendly(message.trim()))
}

/// A parser limit in words: serde-saphyr's own message ends in the breach's Rust debug
/// form (`limits breached: Nodes { nodes: 250001 }`). The limits are serde-saphyr's
/// defaults, far beyond any real config; they stop a hostile file from taking the
/// process's memory or stack.
fn budget_text(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    let what = match breach {
        B::Nodes { .. } => "more than 250000 YAML nodes (values, lists and mappings)".to_string(),
        B::Events { .. } => "more than 1000000 YAML parser events".to_string(),
        B::Depth { .. } => "lists or mappings nested more than 64 deep".to_string(),
        B::Aliases { .. } => "more than 50000 aliases (`*name`)".to_string(),
        B::Anchors { .. } => "more than 50000 anchors (`&name`)".to_string(),
        B::Documents { .. } => "more than 1024 YAML documents".to_string(),
        B::MergeKeys { .. } => "more than 10000 merge keys (`<<`)".to_string(),
        B::AliasAnchorRatio { aliases, anchors } => {
            format!("{aliases} aliases of only {anchors} anchors (an alias bomb?)")
        }
        B::ScalarBytes { .. } => "more than 64 MiB of text in values".to_string(),
        B::InputBytes { .. } => "more than 256 MiB".to_string(),
        _ => "a structure the YAML parser refuses as too large or too complex".to_string(),
    };
    format!("the file is too large or too complex for a config: {what}")
}

/// A number as an error message echoes it: as written for ordinary values, in
/// exponent form from a billion on, so `1e308` is not echoed as its 309 digits.
pub fn number_text(x: f64) -> String {
    if x.abs() < 1e9 || !x.is_finite() {
        x.to_string()
    } else {
        format!("{x:e}")
    }
}

/// Says what was expected for serde-saphyr's terse number errors.
fn friendly(message: &str) -> String {
    match message {
        "invalid floating point" => "expected a number (invalid floating point)".to_string(),
        "expected mapping start" => {
            "expected a mapping of `key: value` lines here (see docs/config.md)".to_string()
        }
        m if m.starts_with("invalid i") || m.starts_with("invalid u") => {
            format!("expected a whole number ({m})")
        }
        m => m.to_string(),
    }
}
