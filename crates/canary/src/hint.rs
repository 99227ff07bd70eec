//! What to do next, appended to a CLI error: every error of a client verb ends with
//! the step that fixes it (set the address, the token, look up the route or phase).
//! Kept apart from the messages themselves, which come from the admin API.

/// The admin API cannot be reached or does not answer.
pub const UNREACHABLE: &str = "is canary serve running? set --admin or CANARY_ADMIN";

/// The next step for an error answer of the admin API, by status and message.
pub fn for_answer(status: u16, message: &str) -> Option<&'static str> {
    Some(match status {
        401 => "set CANARY_ADMIN_TOKEN (or the variable --token-env names) to the admin token",
        404 if message.starts_with("unknown route") => "`canary status` lists the routes",
        404 => "is --admin (CANARY_ADMIN) the admin API's address, not the proxy's?",
        409 => "`canary status ROUTE` shows its phase; docs/rollouts.md says which commands each phase takes",
        500 => "the log of canary serve has the details; check that its state_dir is writable",
        503 => "try again shortly; `canary status` shows what is available",
        _ => return None,
    })
}

/// The next step after `serve` failed to start, from the IO error underneath (the
/// message already says which address or directory).
pub fn for_serve(e: &anyhow::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>())?;
    Some(match io.kind() {
        ErrorKind::AddrInUse => {
            "another process listens there: stop it, or change `listen` / `admin` in the config"
        }
        ErrorKind::AddrNotAvailable => {
            "that IP address is not on this machine: use one of its addresses, or 0.0.0.0"
        }
        ErrorKind::PermissionDenied => {
            "ports below 1024 need root or CAP_NET_BIND_SERVICE (deploy/systemd/canary.service \
             grants it); a state_dir must be writable by this user"
        }
        _ => return None,
    })
}

/// `message (status)` with the hint for it, as the CLI prints an error answer.
pub fn answer(status: u16, message: &str) -> String {
    match for_answer(status, message) {
        Some(h) => format!("{message} ({status}): {h}"),
        None => format!("{message} ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_do_next() {
        assert_eq!(
            answer(404, "unknown route \"nope\""),
            "unknown route \"nope\" (404): `canary status` lists the routes"
        );
        assert!(answer(401, "missing or wrong bearer token").contains("CANARY_ADMIN_TOKEN"));
        assert!(answer(409, "cannot resume: rollout is waiting").contains("canary status ROUTE"));
        assert!(answer(404, "no such endpoint").contains("--admin"));
        // A bad value says what is allowed itself.
        assert_eq!(
            answer(400, "weight 150 is out of range"),
            "weight 150 is out of range (400)"
        );
    }

    #[test]
    fn serve_errors_say_what_to_do_next_from_the_io_error_underneath() {
        use anyhow::Context;
        let busy: anyhow::Result<()> = Err(std::io::Error::from(std::io::ErrorKind::AddrInUse))
            .context("binding listen address 127.0.0.1:8080");
        let h = for_serve(&busy.unwrap_err()).expect("a hint");
        assert!(h.contains("change `listen`"), "{h}");
        assert!(for_serve(&anyhow::anyhow!("not an IO error")).is_none());
    }
}
