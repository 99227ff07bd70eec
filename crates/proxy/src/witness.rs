//! Who saw a failure: the distinct clients behind a run of failures, so that neither
//! the breaker nor passive ejection can be set off by one client on purpose.
//!
//! A client chooses its own sticky key, and rules such as `x-canary: always` let anyone
//! reach the canary, so five requests that make any endpoint answer 500 used to abort a
//! rollout (and eject the canary's only instance). A run of failures now counts only
//! once it comes from at least `min_clients` distinct clients, where two failures are
//! from distinct clients only if they differ in **both** the source address (IPv6 by
//! its /64, which one host usually owns whole) and the sticky key (or the generated id,
//! or, without either, the address again). A client alone can vary its key, not its
//! address; many users behind one NAT vary their keys. A failure to connect to the
//! upstream is no client's doing and counts whatever the number of clients.
//!
//! The record is a few lock-free slots per route and instance, written only on the
//! failure path and cleared by the next success: nothing on the success path beyond
//! one load, and a copy of the key ([`LazyClient`]: the hashes are made on failure).

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use canary_core::rollout::MAX_MIN_CLIENTS;

const SLOTS: usize = MAX_MIN_CLIENTS as usize;

/// The fingerprint of the client of one request: its address and its key, hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientId {
    addr: u64,
    key: u64,
}

impl ClientId {
    /// The client at `ip` with sticky key (or generated id) `key`.
    pub fn new(ip: IpAddr, key: Option<&[u8]>) -> ClientId {
        ClientId::at(ClientId::address(ip), key)
    }

    /// The hash of a client's address, made once per connection (`ConnInfo`) rather
    /// than per request: a keyed hash is ~450 instructions.
    pub fn address(ip: IpAddr) -> u64 {
        match ip.to_canonical() {
            IpAddr::V4(v4) => hash(&[4], &v4.octets()),
            // The /64: one host is usually given a whole /64 and can use any address in it.
            IpAddr::V6(v6) => hash(&[6], &v6.octets()[..8]),
        }
    }

    /// The client whose address hashed to `addr` ([`address`](Self::address)), with
    /// sticky key (or generated id) `key`.
    pub fn at(addr: u64, key: Option<&[u8]>) -> ClientId {
        ClientId {
            addr,
            key: key.map_or(addr, |k| hash(&[0], k)),
        }
    }
}

/// The makings of a request's [`ClientId`], kept until a failure asks for it: the
/// address (or its hash, made once per connection: [`ClientId::address`]) and a copy
/// of the key. A keyed SipHash is ~230 instructions, and most requests never fail;
/// copying a key of up to [`INLINE_KEY`] bytes is a few dozen. A longer key is hashed
/// at once.
#[derive(Clone, Copy, Debug)]
pub struct LazyClient {
    addr: LazyAddr,
    key: LazyKey,
}

/// Keys up to this long are copied rather than hashed on the request path (a UUID,
/// a generated id, most user ids).
pub const INLINE_KEY: usize = 48;

#[derive(Clone, Copy, Debug)]
enum LazyAddr {
    Hashed(u64),
    Ip(IpAddr),
    /// Unknown (see [`ClientId::without_address`]).
    Unknown,
}

#[derive(Clone, Copy, Debug)]
enum LazyKey {
    None,
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Hashed(u64),
}

impl LazyClient {
    /// The client at `ip` with sticky key (or generated id) `key`; see [`ClientId::new`].
    #[inline]
    pub fn new(ip: IpAddr, key: Option<&[u8]>) -> LazyClient {
        LazyClient {
            addr: LazyAddr::Ip(ip),
            key: LazyKey::of(key),
        }
    }

    /// The client whose address hashed to `addr`; see [`ClientId::at`].
    #[inline]
    pub fn at(addr: u64, key: Option<&[u8]>) -> LazyClient {
        LazyClient {
            addr: LazyAddr::Hashed(addr),
            key: LazyKey::of(key),
        }
    }

    /// A client whose address is unknown; see [`ClientId::without_address`].
    #[inline]
    pub fn without_address(key: Option<&[u8]>) -> LazyClient {
        LazyClient {
            addr: LazyAddr::Unknown,
            key: LazyKey::of(key),
        }
    }

    /// The fingerprint, equal to the `ClientId` of the same address and key.
    pub fn id(&self) -> ClientId {
        let key = match &self.key {
            LazyKey::None => None,
            LazyKey::Inline { len, bytes } => Some(hash(&[0], &bytes[..usize::from(*len)])),
            LazyKey::Hashed(h) => Some(*h),
        };
        let addr = match self.addr {
            LazyAddr::Hashed(h) => h,
            LazyAddr::Ip(ip) => ClientId::address(ip),
            LazyAddr::Unknown => {
                let key = key.unwrap_or(0);
                return ClientId { addr: key, key };
            }
        };
        ClientId {
            addr,
            key: key.unwrap_or(addr),
        }
    }
}

impl LazyKey {
    #[inline]
    fn of(key: Option<&[u8]>) -> LazyKey {
        match key {
            None => LazyKey::None,
            Some(k) if k.len() <= INLINE_KEY => {
                let mut bytes = [0u8; INLINE_KEY];
                bytes[..k.len()].copy_from_slice(k);
                LazyKey::Inline {
                    len: k.len() as u8,
                    bytes,
                }
            }
            Some(k) => LazyKey::Hashed(hash(&[0], k)),
        }
    }
}

impl ClientId {
    /// A client whose address is unknown (an embedding application that does not
    /// pass the peer address): told apart by its key alone, which the client chooses,
    /// so `min_clients` then guards less (docs/embedding.md).
    pub fn without_address(key: Option<&[u8]>) -> ClientId {
        let key = key.map_or(0, |k| hash(&[0], k));
        ClientId { addr: key, key }
    }
}

/// Who a failure can be blamed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Witness {
    /// The request of this client failed (an error answer, a timeout, a broken
    /// answer): something this client may have caused itself.
    Client(ClientId),
    /// The upstream could not be connected to: no client causes that.
    Unreachable,
}

/// A process-wide keyed hash, so nobody can pick keys that collide on purpose; never
/// 0, which marks a free slot.
fn hash(domain: &[u8], bytes: &[u8]) -> u64 {
    static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = STATE.get_or_init(Default::default).build_hasher();
    h.write(domain);
    h.write(bytes);
    h.finish().max(1)
}

/// The distinct clients behind the current run of failures.
#[derive(Debug, Default)]
pub struct Spread {
    addrs: [AtomicU64; SLOTS],
    keys: [AtomicU64; SLOTS],
    unreachable: AtomicBool,
}

/// Adds `h` to the set in `slots` (lock-free: slots fill in order and are only
/// emptied by `clear`) and returns how many the set holds, at most `SLOTS`.
fn insert(slots: &[AtomicU64; SLOTS], h: u64) -> u32 {
    for (i, slot) in slots.iter().enumerate() {
        match slot.compare_exchange(0, h, Relaxed, Relaxed) {
            Ok(_) => return i as u32 + 1,
            Err(v) if v == h => {
                return slots.iter().take_while(|s| s.load(Relaxed) != 0).count() as u32
            }
            Err(_) => {}
        }
    }
    SLOTS as u32
}

impl Spread {
    /// Records one failure of the run; returns the clients the run has now (see
    /// [`clients`](Self::clients)).
    pub fn note(&self, w: Witness) -> Option<u32> {
        match w {
            Witness::Unreachable => {
                self.unreachable.store(true, Relaxed);
                None
            }
            Witness::Client(c) => {
                let addrs = insert(&self.addrs, c.addr);
                let keys = insert(&self.keys, c.key);
                if self.unreachable.load(Relaxed) {
                    None
                } else {
                    Some(addrs.min(keys))
                }
            }
        }
    }

    /// The distinct clients of the run (both address and key differ), up to 16;
    /// `None` once an unreachable upstream was among its failures.
    pub fn clients(&self) -> Option<u32> {
        if self.unreachable.load(Relaxed) {
            return None;
        }
        let n = |slots: &[AtomicU64; SLOTS]| {
            slots.iter().take_while(|s| s.load(Relaxed) != 0).count() as u32
        };
        Some(n(&self.addrs).min(n(&self.keys)))
    }

    /// Whether the run's failures come from at least `min` clients (or an unreachable
    /// upstream was among them).
    pub fn enough(clients: Option<u32>, min: u32) -> bool {
        clients.is_none_or(|n| n >= min)
    }

    /// Starts a new run.
    pub fn clear(&self) {
        for s in self.addrs.iter().chain(&self.keys) {
            s.store(0, Relaxed);
        }
        self.unreachable.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str, key: &str) -> Witness {
        Witness::Client(ClientId::new(ip.parse().unwrap(), Some(key.as_bytes())))
    }

    #[test]
    fn one_address_with_many_keys_is_one_client() {
        let s = Spread::default();
        for k in 0..10 {
            assert_eq!(s.note(client("203.0.113.7", &format!("user-{k}"))), Some(1));
        }
        // Another address in the same IPv6 /64 is the same host.
        let s = Spread::default();
        s.note(client("2001:db8::1", "a"));
        assert_eq!(s.note(client("2001:db8::ffff:2", "b")), Some(1));
        assert_eq!(s.note(client("2001:db8:0:1::1", "c")), Some(2));
        // An IPv4-mapped IPv6 address is its IPv4 address.
        let s = Spread::default();
        s.note(client("192.0.2.1", "a"));
        assert_eq!(s.note(client("::ffff:192.0.2.1", "b")), Some(1));
    }

    #[test]
    fn one_key_from_many_addresses_is_one_client_and_both_must_differ() {
        let s = Spread::default();
        for i in 1..10 {
            assert_eq!(s.note(client(&format!("192.0.2.{i}"), "same")), Some(1));
        }
        let s = Spread::default();
        s.note(client("192.0.2.1", "a"));
        s.note(client("192.0.2.2", "b"));
        assert_eq!(s.note(client("192.0.2.3", "c")), Some(3));
        assert!(Spread::enough(s.clients(), 3));
        assert!(!Spread::enough(s.clients(), 4));
        s.clear();
        assert_eq!(s.clients(), Some(0));
    }

    #[test]
    fn without_a_key_the_address_is_the_client() {
        let s = Spread::default();
        let anon = |ip: &str| Witness::Client(ClientId::new(ip.parse().unwrap(), None));
        s.note(anon("192.0.2.1"));
        s.note(anon("192.0.2.1"));
        assert_eq!(s.note(anon("192.0.2.2")), Some(2));
    }

    #[test]
    fn an_unreachable_upstream_counts_whatever_the_clients() {
        let s = Spread::default();
        s.note(client("192.0.2.1", "a"));
        assert_eq!(s.note(Witness::Unreachable), None);
        assert_eq!(s.note(client("192.0.2.1", "a")), None);
        assert!(Spread::enough(s.clients(), 16));
        s.clear();
        assert_eq!(s.clients(), Some(0));
    }

    #[test]
    fn a_lazy_client_is_the_same_client() {
        let long = "k".repeat(INLINE_KEY + 1);
        for ip in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            for key in [
                None,
                Some(&b""[..]),
                Some(b"user-1"),
                Some(&[7u8; INLINE_KEY][..]),
                Some(long.as_bytes()),
            ] {
                assert_eq!(
                    LazyClient::new(ip, key).id(),
                    ClientId::new(ip, key),
                    "{ip} {key:?}"
                );
                assert_eq!(
                    LazyClient::at(ClientId::address(ip), key).id(),
                    ClientId::new(ip, key),
                    "{ip} {key:?}"
                );
            }
        }
        for key in [None, Some(&b"user-1"[..]), Some(long.as_bytes())] {
            assert_eq!(
                LazyClient::without_address(key).id(),
                ClientId::without_address(key)
            );
        }
        assert_ne!(
            LazyClient::new([192, 0, 2, 1].into(), Some(b"a")).id(),
            LazyClient::new([192, 0, 2, 1].into(), Some(b"b")).id()
        );
    }

    #[test]
    fn the_count_saturates_at_the_slots() {
        let s = Spread::default();
        for i in 0..40 {
            s.note(client(&format!("10.0.0.{i}"), &format!("k{i}")));
        }
        assert_eq!(s.clients(), Some(16));
    }
}
