//! HTTP/2 written by hand, for requests that are malformed on purpose: the `h2` client
//! crate refuses to send them, so the frames and the HPACK block are made here.
//!
//! The HPACK block holds only literal fields without indexing and with new names, and
//! no Huffman coding (RFC 7541 §6.2.2, §5.1, §5.2): every byte of every name and value
//! reaches the server's decoder as written, uppercase, CR, LF and NUL included. The
//! reader answers what the server did with stream 1: a response status, a stream
//! reset, a connection error, or a close.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// RFC 9113 §7.
pub const PROTOCOL_ERROR: u32 = 0x1;

/// One frame: the 9-byte header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1); `first` holds the bits
/// above the prefix.
fn integer(out: &mut Vec<u8>, prefix_bits: u32, first: u8, mut n: usize) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 7, 0x00, s.len());
    out.extend_from_slice(s);
}

/// A header block of literal fields without indexing, each with a new name (RFC 7541
/// §6.2.2), in the order given: pseudo-header fields are fields like any other here.
pub fn hpack_literals(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        string(&mut out, name);
        string(&mut out, value);
    }
    out
}

/// What the server did with stream 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A response head; the status when it is one of the static table's (RFC 7541
    /// Appendix A: 200, 204, 206, 304, 400, 404, 500), else 0.
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code (a connection error).
    GoAway(u32),
    /// The connection closed with neither.
    Closed,
}

/// The status of a response header block's first field, the way the `h2` crate
/// encodes it: indexed when it is in the static table.
fn status_of(block: &[u8]) -> u16 {
    match block.first() {
        Some(b) if b & 0x80 != 0 => match b & 0x7f {
            8 => 200,
            9 => 204,
            10 => 206,
            11 => 304,
            12 => 400,
            13 => 404,
            14 => 500,
            _ => 0,
        },
        _ => 0,
    }
}

/// Opens an HTTP/2 connection with prior knowledge to `addr`, sends the preface, an
/// empty SETTINGS and `frames` (stream 1), and reads until the server answers stream
/// 1 (acknowledging its SETTINGS on the way). Panics after `wait`.
pub async fn exchange(addr: SocketAddr, frames: &[u8], wait: Duration) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend_from_slice(frames);
    s.write_all(&out).await.expect("write");
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let payload: Vec<u8> = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                match kind {
                    SETTINGS if flags & ACK == 0 => {
                        // Unanswered, the server may end the connection.
                        let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                    }
                    HEADERS if stream == 1 => return Reply::Status(status_of(&payload)),
                    RST_STREAM if stream == 1 && payload.len() >= 4 => {
                        return Reply::Reset(u32::from_be_bytes([
                            payload[0], payload[1], payload[2], payload[3],
                        ]));
                    }
                    GOAWAY if payload.len() >= 8 => {
                        let code =
                            u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                        let last =
                            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                                & 0x7fff_ffff;
                        // A graceful GOAWAY that still lets stream 1 finish is not
                        // its answer.
                        if code != 0 || last < 1 {
                            return Reply::GoAway(code);
                        }
                    }
                    _ => {}
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Reply::Closed,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read)
        .await
        .expect("the server answered stream 1 in time")
}
