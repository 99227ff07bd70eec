//! The CLI's output, without `println!`'s panic on a closed pipe.
//!
//! `canary events web | head -2` closes the pipe while `canary` still writes, and
//! `println!` then panics ("failed printing to stdout: Broken pipe", exit 101). Here a
//! closed stdout is not an error: the rest of the output is dropped and the verb
//! finishes with its own exit code, so what `wait` reports never depends on whether
//! anyone still reads its progress lines. Any other write error (a full disk) is
//! reported once on stderr, the rest of the output is dropped, and `main` turns the exit
//! code into an error. (The workspace forbids `unsafe`, so SIGPIPE stays ignored, as
//! Rust sets it, and the error arrives here as `EPIPE`.)

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, Ordering};

const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const FAILED: u8 = 2;

static STDOUT: AtomicU8 = AtomicU8::new(OPEN);

/// Writes one line to stdout (see the module docs for what happens on an error).
pub fn line(args: fmt::Arguments<'_>) {
    write(format_args!("{args}\n"));
}

/// Writes `text` to stdout as it is, without a newline: the live line of `wait` and
/// `status --watch` redraws itself in place.
pub fn raw(text: &str) {
    write(format_args!("{text}"));
}

fn write(args: fmt::Arguments<'_>) {
    if STDOUT.load(Ordering::Relaxed) != OPEN {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            STDOUT.store(CLOSED, Ordering::Relaxed);
        } else {
            STDOUT.store(FAILED, Ordering::Relaxed);
            err_line(format_args!("canary: cannot write the output: {e}"));
        }
    }
}

/// Writes one line to stderr; a stderr that cannot be written is ignored (there is
/// nowhere left to report it).
pub fn err_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// `s` with every control character, and the bidirectional controls that reorder what
/// a terminal shows, escaped as in Rust source (`\n`, `\u{1b}`, `\u{202e}`): text that
/// came through the API (an abort reason) can neither forge a line of `canary events`
/// nor drive the terminal. Backslashes stay as they are, so ordinary text prints as is.
pub fn printable(s: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Whether some output could not be written for another reason than a closed pipe.
pub fn failed() -> bool {
    STDOUT.load(Ordering::Relaxed) == FAILED
}

/// `println!` through [`line()`].
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// `eprintln!` through [`err_line`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::err_line(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn a_newline_or_escape_sequence_in_api_text_cannot_forge_a_line_or_reach_the_terminal() {
        assert_eq!(printable("deploy 42 broke"), "deploy 42 broke");
        assert_eq!(
            printable("x\n2026-01-01T00:00:00Z  promote  forged"),
            "x\\n2026-01-01T00:00:00Z  promote  forged"
        );
        assert_eq!(printable("\u{1b}[2J\r\t"), "\\u{1b}[2J\\r\\t");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(printable("naïve C:\\path"), "naïve C:\\path");
    }
}
