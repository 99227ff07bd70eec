//! Listening sockets that outlive a process, so a restart or an upgrade of `canary
//! serve` refuses no connection (docs/operations.md, "Zero-downtime restart").
//!
//! Two ways in:
//! - **systemd socket activation**: the proxy's listening sockets come from the
//!   service manager (`LISTEN_FDS`/`LISTEN_PID`, read by the `listenfd` crate). They
//!   stay open in systemd while the service restarts, so new connections wait in the
//!   kernel's queue instead of being refused.
//! - **hand-over** (HAProxy's `-x`, nginx's binary upgrade): every `canary serve`
//!   listens on a Unix socket in its `state_dir`; `canary serve --takeover` connects
//!   to it and receives the proxy's and the admin API's listening sockets (SCM_RIGHTS,
//!   through `rustix`, whose API hands back owned descriptors: no `unsafe` here).
//!   Both processes accept from the same sockets until the new one says it serves;
//!   then the old one stops accepting, drains its connections and exits.
//!
//! The exchange, one line each way plus the descriptors:
//! `takeover 1` (new → old) · `fds <proxy> <admin>` with the descriptors (old → new;
//! the old process has stopped its controller and admin API first, so only one
//! controller ever writes the state files) · `serving` (new → old). If the new process
//! closes the connection without `serving`, the old one resumes its controller and
//! admin API and goes on serving.

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::mpsc;

/// The hand-over socket's file name in `state_dir`.
pub const SOCKET_NAME: &str = "handover.sock";
/// The most descriptors one hand-over carries (the kernel's `SCM_MAX_FD` is 253).
const MAX_FDS: usize = 253;
/// How long either side waits for the other's next line.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const HELLO: &str = "takeover 1\n";
const SERVING: &str = "serving\n";

/// The hand-over socket's path for a `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Listening sockets passed by systemd (`LISTEN_FDS`), all taken as proxy listeners;
/// empty when the process was not socket-activated.
pub fn from_systemd() -> io::Result<Vec<TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i)? {
            Some(l) => out.push(l),
            None => {
                return Err(io::Error::other(format!(
                    "LISTEN_FDS: descriptor {} is not a TCP listening socket",
                    i + 3
                )))
            }
        }
    }
    Ok(out)
}

/// What the process being replaced handed over.
pub struct Inherited {
    /// The proxy's listening sockets (one per worker of the old process).
    pub proxy: Vec<TcpListener>,
    /// The admin API's listening socket.
    pub admin: TcpListener,
    /// The old process, waiting to hear that this one serves.
    pub from: Predecessor,
}

/// The connection to the process being replaced.
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// Tells the old process this one accepts on the sockets: it stops accepting,
    /// drains and exits.
    pub fn serving(mut self) -> io::Result<()> {
        self.0.write_all(SERVING.as_bytes())
    }
}

/// Takes the listening sockets over from the `canary serve` whose hand-over socket is
/// in `state_dir`. Blocking, each step bounded by [`STEP_TIMEOUT`].
pub fn take_over(state_dir: &Path) -> io::Result<Inherited> {
    let path = socket_path(state_dir);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "no running canary to take over from at {}: {e}",
                path.display()
            ),
        )
    })?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.write_all(HELLO.as_bytes())?;
    let (line, fds) = recv_fds(&s)?;
    let counts: Vec<usize> = line
        .strip_prefix("fds ")
        .map(|r| {
            r.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let [proxy, admin] = counts[..] else {
        return Err(io::Error::other(format!(
            "unexpected answer from the running canary: {line:?}"
        )));
    };
    if admin != 1 || proxy == 0 || proxy + admin != fds.len() {
        return Err(io::Error::other(format!(
            "the running canary sent {} descriptors for {line:?}",
            fds.len()
        )));
    }
    let mut listeners: Vec<TcpListener> = fds.into_iter().map(TcpListener::from).collect();
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let admin = listeners.pop().expect("one admin listener, counted above");
    Ok(Inherited {
        proxy: listeners,
        admin,
        from: Predecessor(s),
    })
}

/// Receives one line and the descriptors sent with it.
fn recv_fds(s: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut data = [0u8; 128];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        s,
        &mut [IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let line = String::from_utf8_lossy(&data[..got.bytes])
        .trim_end()
        .to_string();
    Ok((line, fds))
}

/// The hand-over socket of a serving process: takeover requests arrive on
/// [`Server::requests`].
pub struct Server {
    path: PathBuf,
    pub requests: mpsc::Receiver<Request>,
}

/// A new process asking for the listening sockets.
pub struct Request(UnixStream);

impl Server {
    /// Listens on the hand-over socket in `state_dir`, replacing a stale one (a
    /// running canary on the same `state_dir` would hold the ports this process has
    /// just bound, so a file there is left from a process that is gone or is being
    /// replaced by this one).
    pub fn listen(state_dir: &Path) -> io::Result<Server> {
        let path = socket_path(state_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        // Whoever can connect can take the ports: the service's user only.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let (tx, requests) = mpsc::channel(1);
        // A plain thread: accepting is rare and blocking, and the thread ends with
        // the process.
        std::thread::Builder::new()
            .name("canary-handover".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    match read_line(&conn, Duration::from_secs(5)) {
                        Ok(l) if l == HELLO.trim_end() => {
                            if tx.blocking_send(Request(conn)).is_err() {
                                return;
                            }
                        }
                        Ok(l) => tracing::warn!(line = %l, "hand-over socket: unknown request"),
                        Err(e) => tracing::warn!(error = %e, "hand-over socket: no request"),
                    }
                }
            })?;
        Ok(Server { path, requests })
    }

    /// Removes the socket file (at a stop that hands nothing over).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Request {
    /// Sends `proxy` and `admin` to the new process and waits (blocking, bounded)
    /// until it serves on them. `Err`: it failed or went away; the sockets are still
    /// ours and this process must go on serving.
    pub fn hand_over(self, proxy: &[TcpListener], admin: &TcpListener) -> io::Result<()> {
        let mut fds: Vec<_> = proxy.iter().map(AsFd::as_fd).collect();
        fds.push(admin.as_fd());
        if fds.len() > MAX_FDS {
            return Err(io::Error::other("too many listening sockets to hand over"));
        }
        let line = format!("fds {} 1\n", proxy.len());
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("descriptor buffer too small"));
        }
        sendmsg(
            &self.0,
            &[IoSlice::new(line.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )?;
        match read_line(&self.0, STEP_TIMEOUT)? {
            l if l == SERVING.trim_end() => Ok(()),
            l => Err(io::Error::other(format!(
                "the new process answered {l:?} instead of serving"
            ))),
        }
    }
}

/// One line from `s` (without its newline); an error at EOF or after `timeout`.
fn read_line(s: &UnixStream, timeout: Duration) -> io::Result<String> {
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a whole line",
        ));
    }
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_cross_the_handover_socket_and_still_accept() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut server = Server::listen(dir.path()).unwrap();
        let proxy: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let admin = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs: Vec<_> = proxy.iter().map(|l| l.local_addr().unwrap()).collect();
        let admin_addr = admin.local_addr().unwrap();
        let dir_path = dir.path().to_path_buf();
        let new = std::thread::spawn(move || {
            let got = take_over(&dir_path).unwrap();
            let seen: Vec<_> = got.proxy.iter().map(|l| l.local_addr().unwrap()).collect();
            got.from.serving().unwrap();
            (seen, got.admin.local_addr().unwrap(), got.proxy)
        });
        let req = rt.block_on(server.requests.recv()).unwrap();
        req.hand_over(&proxy, &admin).unwrap();
        let (seen, seen_admin, taken) = new.join().unwrap();
        assert_eq!(seen, addrs);
        assert_eq!(seen_admin, admin_addr);
        // The old side closes its copies; the new side's still accept.
        drop(proxy);
        let _client = std::net::TcpStream::connect(addrs[0]).unwrap();
        taken[0].set_nonblocking(false).unwrap();
        assert!(taken[0].accept().is_ok());
    }

    #[test]
    fn a_new_process_that_goes_away_leaves_the_sockets_with_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut server = Server::listen(dir.path()).unwrap();
        let proxy = vec![TcpListener::bind("127.0.0.1:0").unwrap()];
        let admin = TcpListener::bind("127.0.0.1:0").unwrap();
        let dir_path = dir.path().to_path_buf();
        let new = std::thread::spawn(move || {
            // Takes the sockets, then fails before serving.
            drop(take_over(&dir_path).unwrap());
        });
        let req = rt.block_on(server.requests.recv()).unwrap();
        let err = req.hand_over(&proxy, &admin).expect_err("no `serving`");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        new.join().unwrap();
        let addr = proxy[0].local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        assert!(proxy[0].accept().is_ok());
    }

    #[test]
    fn taking_over_with_nobody_there_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let err = take_over(dir.path())
            .err()
            .expect("nobody to take over from");
        assert!(err.to_string().contains(SOCKET_NAME), "{err}");
    }
}
