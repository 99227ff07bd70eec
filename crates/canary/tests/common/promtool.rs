//! `promtool check metrics`, shared by the binary's tests and canary-tower's (which
//! include this file by path: two test crates, one helper, no test-support crate for
//! thirty lines).

/// `promtool check metrics` on an exposition, as Prometheus would parse and lint it.
/// Without promtool: a note, except under `CI=true`, where it is required.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .expect("promtool stdin")
                .write_all(text.as_bytes())
                .expect("write to promtool");
            let out = child.wait_with_output().expect("promtool output");
            assert!(
                out.status.success(),
                "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("promtool is required in CI (scripts/test.sh extracts prometheus): {e}")
        }
        Err(e) => eprintln!("note: promtool not found ({e}); skipping the promtool check"),
    }
}
