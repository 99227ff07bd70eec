//! What a rejected config file reports: every problem, each with file:line:column.

use std::fmt;

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as it was named to [`crate::parse`] / [`crate::load`].
    pub file: String,
    /// 1-based line; 0 when the problem has no position (e.g. an unreadable file).
    pub line: u64,
    /// 1-based column (in characters); 0 when unknown.
    pub column: u64,
    /// What is wrong and what is allowed, on one line.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// A config file that cannot be used, with every problem found in it.
///
/// `Display` prints one `file:line:column: message` line per diagnostic, in file order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.diagnostics))]
pub struct ConfigError {
    /// Never empty.
    pub diagnostics: Vec<Diagnostic>,
}

fn lines(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(Diagnostic::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// A single problem.
    pub fn single(file: &str, line: u64, column: u64, message: impl Into<String>) -> Self {
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: file.to_string(),
                line,
                column,
                message: message.into(),
            }],
        }
    }
}
