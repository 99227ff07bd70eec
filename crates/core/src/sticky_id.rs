//! Sticky ids for clients that bring no sticky key, and the cookie they are kept in.
//!
//! Shared by the proxy and the embedded layer (`canary-tower`) so both hand out the
//! same kind of id in the same cookie. The id source is seeded by the caller (the
//! core reads no randomness itself); the rest is arithmetic on a counter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The attributes of a generated sticky cookie, after `name=id` (docs/routing.md).
pub const COOKIE_ATTRIBUTES: &str = "; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax";

/// Hands out sticky ids: 128 bits as 32 lowercase hex digits, unique within the
/// source (a counter) and unpredictable across processes when the seed is random
/// (the counter hashed with xxh3-128 under the seed). Sticky ids need uniqueness, not
/// secrecy, so this avoids a CSPRNG dependency; xxh3 is already the bucket hash, and
/// one call gives the 128 bits. Written into a stack buffer: no allocation, no `fmt`.
#[derive(Debug)]
pub struct IdSource {
    seed: u64,
    counter: AtomicU64,
}

impl IdSource {
    /// A source whose ids are derived from `seed` (give it a per-process random one,
    /// e.g. from `std::hash::RandomState`).
    pub const fn new(seed: u64) -> IdSource {
        IdSource {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// The next id.
    #[inline]
    pub fn next_id(&self) -> [u8; 32] {
        let n = self.counter.fetch_add(1, Relaxed);
        hex32(xxhash_rust::xxh3::xxh3_128_with_seed(
            &n.to_le_bytes(),
            self.seed,
        ))
    }
}

/// `id` as 32 lowercase hex digits, two per byte from a table (half the steps of a
/// digit per nibble).
pub fn hex32(id: u128) -> [u8; 32] {
    static HEX_PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = [HEX[b >> 4], HEX[b & 0xf]];
            b += 1;
        }
        t
    };
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(id.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_32_hex_digits_and_distinct() {
        for id in [
            0,
            1,
            0xfe,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(hex32(id), format!("{id:032x}").as_bytes(), "{id:x}");
        }
        let ids = IdSource::new(7);
        let a = ids.next_id();
        let b = ids.next_id();
        assert_ne!(a, b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, IdSource::new(8).next_id(), "the seed changes the ids");
    }
}
