//! Idle keep-alive connections, parked: one task and one epoll set per listener hold
//! every connection that waits for its next request, as nginx holds its idle ones
//! (issue 16: memory per idle connection, against nginx's ~0.6 KiB).
//!
//! A serving task that has waited [`IDLE_RELEASE`](crate::connection) with nothing read
//! ends and hands its socket here ([`Lot::park`]). The socket leaves tokio's event
//! loop (whose per-socket record is 256 bytes) for the lot's own epoll set, where the
//! kernel keeps its interest; what stays per connection in the process is the socket's
//! descriptor, the connection's facts, its slot under `limits.max_connections` and when
//! its keep-alive wait ends: under 0.1 KiB here, plus its `ConnInfo`. The lot's one
//! task wakes for three things: parked sockets readable (the epoll set is readable: a
//! serving task is spawned for each, back in tokio's loop), the earliest keep-alive
//! deadline (those connections are closed), and the listener's stop (those whose
//! client has sent are served once more, and close after the answer; the rest close). Parking and waking cost four `epoll_ctl` calls, made
//! only after an idle spell of [`IDLE_RELEASE`](crate::connection).
//!
//! Hand-written, on `rustix`'s epoll: tokio holds every socket it polls in a record of
//! its own and gives no way to wait on many without one each, and a task per parked
//! connection (with its timer) cost ~1 KiB more than this (docs/performance.md).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::event::epoll;
use rustix::event::Timespec;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::connection::{self, Resume, Settings};
use crate::request::ConnInfo;

/// An idle keep-alive connection between two requests: what it needs to be served
/// again, and nothing sized for a request.
pub(crate) struct Parked {
    pub io: TcpStream,
    pub conn: Arc<ConnInfo>,
    /// Its slot under `limits.max_connections`, held until it closes.
    pub permit: OwnedSemaphorePermit,
    /// Whether a request has been served on it (then it is HTTP/1.1 from here on).
    pub served: bool,
    /// When its wait for the next request ends (it is closed then).
    pub deadline: Instant,
}

/// Where serving tasks hand their idle connections: the sending side of the lot.
#[derive(Clone)]
pub(crate) struct Lot {
    tx: mpsc::UnboundedSender<Parked>,
}

/// The lot's task, before it runs: see [`Yard::run`].
pub(crate) struct Yard {
    rx: mpsc::UnboundedReceiver<Parked>,
}

impl Lot {
    pub(crate) fn new() -> (Lot, Yard) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Lot { tx }, Yard { rx })
    }

    /// Parks `parked`; closes it when the lot has stopped (the listener is stopping).
    pub(crate) fn park(&self, parked: Parked) {
        // A send fails only once the lot's task has ended, at the stop: dropping the
        // connection closes it, as the stop asks.
        let _ = self.tx.send(parked);
    }
}

/// Events taken from the epoll set at a time.
const EVENTS: usize = 64;

/// A parked connection, out of tokio's event loop.
struct Entry {
    io: std::net::TcpStream,
    conn: Arc<ConnInfo>,
    permit: OwnedSemaphorePermit,
    served: bool,
    deadline: Instant,
    /// Which connection holds the slot: a slot is reused, and an event or a deadline
    /// of an earlier holder must not touch the next.
    generation: u32,
}

/// A slot and its holder, as one number (the epoll event's data).
fn key(slot: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | slot as u64
}

fn unkey(key: u64) -> (usize, u32) {
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

/// The parked connections of one listener.
struct ParkedSet {
    epoll: AsyncFd<OwnedFd>,
    entries: Slab<Entry>,
    /// Deadlines by time; those of connections woken since stay until they come up
    /// (or a sweep), and are then skipped.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    generation: u32,
}

impl Yard {
    /// Holds the parked connections of one listener until `stop` turns true. The lot
    /// holds `settings` (to serve a woken connection) and receivers of `stop`, so the
    /// listener's drain waits for it; it ends at the stop, closing them all.
    pub(crate) async fn run(self, settings: Arc<Settings>, mut stop: watch::Receiver<bool>) {
        let mut rx = self.rx;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(io::Error::from)
            .and_then(|fd| {
                // The one `unsafe` of the workspace (measured need: see the module
                // docs). SAFETY: `fd` is an `OwnedFd` the `AsyncFd` owns from here on;
                // it stays open and is the same descriptor until the `AsyncFd` is
                // dropped, which is what `register_with_interest` asks.
                #[allow(unsafe_code)]
                let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
                registered.map_err(io::Error::from)
            });
        let epoll = match epoll {
            Ok(epoll) => epoll,
            Err(e) => {
                // Without a lot, idle connections close at their park (each client
                // reconnects); said once, as it does not heal.
                tracing::error!(error = %e, "cannot make the idle connections' epoll set; idle keep-alive connections will be closed");
                return;
            }
        };
        let mut yard = ParkedSet {
            epoll,
            entries: Slab::new(),
            deadlines: BinaryHeap::new(),
            generation: 0,
        };
        // Given to the serving tasks of woken connections (`stop` is borrowed by its
        // wait below).
        let serving_stop = stop.clone();
        let mut woke: Vec<u64> = Vec::with_capacity(EVENTS);
        loop {
            let next_deadline = yard.deadlines.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {
                    // Connections whose client sent as the stop came are served (their
                    // serving tasks see the stop and close after the answer); closing
                    // them with the request unread would reset them. The rest close.
                    while let Ok(parked) = rx.try_recv() {
                        yard.park(parked);
                    }
                    while yard.ready(&mut woke).unwrap_or(false) {}
                    yard.serve(&mut woke, &settings, &serving_stop);
                    return;
                }
                parked = rx.recv() => {
                    let Some(parked) = parked else { return };
                    yard.park(parked);
                }
                ready = yard.epoll.readable() => {
                    let Ok(mut ready) = ready else { return };
                    // What is ready now, up to `EVENTS` (the rest at the next turn:
                    // tokio keeps the readiness); fewer, or an empty answer, clears it
                    // (a later event wakes the set again).
                    let waited = ready.try_io(|_| {
                        if yard.ready(&mut woke)? {
                            Ok(())
                        } else {
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                    });
                    if let Ok(Err(e)) = waited {
                        if e.kind() != io::ErrorKind::Interrupted {
                            tracing::warn!(error = %e, "epoll_wait on the idle connections failed");
                        }
                    }
                    yard.serve(&mut woke, &settings, &serving_stop);
                }
                () = sleep_until(next_deadline) => yard.expire(Instant::now()),
            }
            yard.tidy();
        }
    }
}

impl ParkedSet {
    /// Adds the keys of the ready sockets, up to [`EVENTS`], to `woke`; whether there
    /// may be more (as many as asked for came back).
    fn ready(&self, woke: &mut Vec<u64>) -> io::Result<bool> {
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); EVENTS];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let (events, _) = epoll::wait(self.epoll.get_ref(), &mut events, Some(&zero))?;
        woke.extend(events.iter().map(|e| e.data.u64()));
        Ok(events.len() == EVENTS)
    }

    /// Serves the connections `woke` names again, each in a serving task of its own.
    fn serve(
        &mut self,
        woke: &mut Vec<u64>,
        settings: &Arc<Settings>,
        stop: &watch::Receiver<bool>,
    ) {
        for key in woke.drain(..) {
            if let Some((io, conn, permit, resume)) = self.unpark(key) {
                #[cfg(test)]
                connection::tests::count(&connection::tests::WOKEN);
                connection::spawn(io, conn, settings.clone(), stop.clone(), permit, resume);
            }
        }
    }

    /// Whether `key`'s connection still holds its slot.
    fn holds(&self, key: u64) -> bool {
        let (slot, generation) = unkey(key);
        self.entries
            .get(slot)
            .is_some_and(|e| e.generation == generation)
    }

    /// Takes the socket out of tokio's loop into the epoll set; closes it if either
    /// step fails.
    fn park(&mut self, parked: Parked) {
        let Ok(io) = parked.io.into_std() else {
            return;
        };
        self.generation = self.generation.wrapping_add(1);
        let slot = self.entries.vacant_key();
        if u32::try_from(slot).is_err() {
            return;
        }
        let key = key(slot, self.generation);
        // One event, then none until it is added again (`ONESHOT`): a woken socket
        // belongs to its serving task.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
        if epoll::add(
            self.epoll.get_ref(),
            &io,
            epoll::EventData::new_u64(key),
            flags,
        )
        .is_err()
        {
            return;
        }
        self.deadlines.push(Reverse((parked.deadline, key)));
        self.entries.insert(Entry {
            io,
            conn: parked.conn,
            permit: parked.permit,
            served: parked.served,
            deadline: parked.deadline,
            generation: self.generation,
        });
    }

    /// The connection an event names, back in tokio's loop, with what its serving task
    /// needs; `None` for an event of an earlier holder of the slot, or a socket tokio
    /// cannot take back (closed).
    fn unpark(
        &mut self,
        key: u64,
    ) -> Option<(TcpStream, Arc<ConnInfo>, OwnedSemaphorePermit, Resume)> {
        if !self.holds(key) {
            return None;
        }
        let entry = self.entries.remove(unkey(key).0);
        let _ = epoll::delete(self.epoll.get_ref(), &entry.io);
        let io = TcpStream::from_std(entry.io).ok()?;
        let resume = Resume::parked(entry.served, entry.deadline);
        Some((io, entry.conn, entry.permit, resume))
    }

    /// Closes the connections whose keep-alive wait ended by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if self.holds(key) {
                // Dropped: the socket closes (and leaves the epoll set), the slot and
                // the connection's permit are freed.
                self.entries.remove(unkey(key).0);
            }
        }
    }

    /// Keeps the heap of deadlines and the slab in proportion to what is parked.
    fn tidy(&mut self) {
        if self.deadlines.len() > 2 * self.entries.len() + 1024 {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|&Reverse((_, key))| self.holds(key));
            self.deadlines = deadlines;
        }
        if self.entries.capacity() > 4096 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to_fit();
        }
    }
}

/// Until `at`, or never.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use crate::connection::tests::{counts, exchange};
    use crate::connection::IDLE_RELEASE;
    use crate::snapshot::Proxy;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n";

    /// Reads one answer (head and `content-length` body); its head, lowercased.
    async fn answer(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_buf(&mut got));
            assert!(read.await.unwrap().unwrap() > 0, "closed without an answer");
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return head;
            }
        }
    }

    async fn closed(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await;
        matches!(read, Ok(Ok(0)))
    }

    /// A listener on a proxy with no routes (every request a `404`), until `stop`.
    async fn listener() -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::server::serve(
            std::sync::Arc::new(Proxy::new()),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        (addr, stop, server)
    }

    #[tokio::test(start_paused = true)]
    async fn each_parked_connection_wakes_for_its_own_request_and_the_stop_closes_the_rest() {
        let (addr, stop, server) = listener().await;
        let mut clients = Vec::new();
        for _ in 0..150 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            exchange(&mut client).await;
            clients.push(client);
        }
        tokio::time::sleep(IDLE_RELEASE * 3).await;
        assert_eq!(counts(), (150, 0), "all 150 parked");

        // Every other one, last first, each answered before the next sends: woken one
        // at a time, in slots the next park reuses.
        for round in 1..=2 {
            for client in clients.iter_mut().rev().step_by(2) {
                exchange(client).await;
            }
            tokio::time::sleep(IDLE_RELEASE * 3).await;
            assert_eq!(counts(), (150 + 75 * round, 75 * round), "round {round}");
        }

        // All 150 send before any answer is read: more ready at once than one
        // `epoll_wait` takes (64), and every one is served.
        for client in &mut clients {
            client.write_all(REQUEST).await.unwrap();
        }
        for client in &mut clients {
            let head = answer(client).await;
            assert!(head.starts_with("http/1.1 404"), "{head}");
        }
        tokio::time::sleep(IDLE_RELEASE * 3).await;
        assert_eq!(counts(), (450, 300));

        // A client that hangs up while parked is woken, finds the end, and closes.
        drop(clients.pop());
        tokio::time::sleep(IDLE_RELEASE).await;
        assert_eq!(counts(), (450, 301));

        // The stop closes every parked connection, and the drain ends.
        stop.send(()).unwrap();
        for client in &mut clients {
            assert!(closed(client).await, "still open after the stop");
        }
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the drain waits for nothing parked")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_parked_again_is_closed_at_its_own_deadline_not_an_earlier_one() {
        let proxy = Proxy::new();
        let timeout = Duration::from_millis(proxy.snapshot().limits.header_timeout_ms);
        let (addr, _stop, _server) = listener().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        exchange(&mut client).await;
        // Parked with a deadline `timeout` from now; woken halfway and parked again, so
        // its first deadline comes due while it waits with a later one.
        tokio::time::sleep(timeout / 2).await;
        exchange(&mut client).await;
        tokio::time::sleep(IDLE_RELEASE * 2).await;
        assert_eq!(counts(), (2, 1));
        tokio::time::sleep(timeout / 2).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(50), client.read(&mut byte)).await;
        assert!(
            read.is_err(),
            "closed at the deadline it had before: {read:?}"
        );
        // ...and at its own.
        tokio::time::sleep(timeout / 2).await;
        assert!(closed(&mut client).await, "open past its deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_as_the_stop_comes_is_answered_then_closed() {
        let (addr, stop, server) = listener().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        exchange(&mut client).await;
        tokio::time::sleep(IDLE_RELEASE * 3).await;
        assert_eq!(counts(), (1, 0));
        // The request is in the socket before the lot sees either.
        client.write_all(REQUEST).await.unwrap();
        stop.send(()).unwrap();
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 404"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(closed(&mut client).await);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
