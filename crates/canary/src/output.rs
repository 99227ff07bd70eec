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
