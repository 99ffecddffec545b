//! Frames on a gang's TCP connections: `ANL1`, kind (1 byte), sequence number (u64 LE), payload
//! length (u32 LE), payload. Data frames are numbered 1, 2, ... per connection and the receiver
//! checks the number, so a lost, repeated or foreign frame is an error, never a wrong sum.

use super::DistError;
use std::io::{Read, Write};

const MAGIC: &[u8; 4] = b"ANL1";
/// A payload larger than this is refused before allocating (a foreign or corrupt stream).
const MAX_PAYLOAD: usize = 1 << 31;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A rank introduces itself to rank 0 (JSON [`super::tcp::Hello`]).
    Hello = 1,
    /// Rank 0 admits a rank: the peer list (JSON).
    Welcome = 2,
    /// Rank 0 or a neighbour refuses: the reason (UTF-8).
    Reject = 3,
    /// A rank introduces itself to its right neighbour (JSON).
    RingHello = 4,
    /// A chunk of a collective.
    Data = 5,
    /// The sender lives (sent when it has nothing else to send).
    Heartbeat = 6,
    /// The sender gives up the collective: the reason (UTF-8).
    Abort = 7,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Reject,
            4 => Self::RingHello,
            5 => Self::Data,
            6 => Self::Heartbeat,
            7 => Self::Abort,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Sequence number (data frames; 0 otherwise).
    pub seq: u64,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Writes one frame (header and payload in one buffer, one write).
pub fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    seq: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(17 + payload.len());
    buf.extend_from_slice(MAGIC);
    buf.push(kind as u8);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame. I/O errors (a timeout included) are returned as such for the caller to
/// judge; a malformed header is a [`DistError::Protocol`] inside an `InvalidData` error.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Frame> {
    let mut header = [0u8; 17];
    r.read_exact(&mut header)?;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    if &header[..4] != MAGIC {
        return Err(invalid("not an anneal gang frame (bad magic)".into()));
    }
    let kind = Kind::from_byte(header[4])
        .ok_or_else(|| invalid(format!("unknown frame kind {}", header[4])))?;
    let seq = u64::from_le_bytes(header[5..13].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(header[13..17].try_into().unwrap_or_default()) as usize;
    if len > MAX_PAYLOAD {
        return Err(invalid(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Frame { kind, seq, payload })
}

/// Whether an I/O error is a read or write timeout.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The gang error for an I/O error on the link with `peer`.
pub fn link_error(peer: &str, e: &std::io::Error, silence: std::time::Duration) -> DistError {
    if is_timeout(e) {
        DistError::PeerLost(format!("{peer} sent nothing for {silence:?}"))
    } else if e.kind() == std::io::ErrorKind::InvalidData {
        DistError::Protocol(format!("{peer}: {e}"))
    } else {
        DistError::PeerLost(format!("{peer}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Data, 7, b"abc").unwrap();
        write_frame(&mut buf, Kind::Heartbeat, 0, b"").unwrap();
        let mut r = std::io::Cursor::new(buf);
        let f = read_frame(&mut r).unwrap();
        assert_eq!(
            (f.kind, f.seq, f.payload.as_slice()),
            (Kind::Data, 7, &b"abc"[..])
        );
        assert_eq!(read_frame(&mut r).unwrap().kind, Kind::Heartbeat);
        let err = read_frame(&mut std::io::Cursor::new(
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ));
        assert_eq!(err.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        let mut huge = b"ANL1\x05".to_vec();
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut std::io::Cursor::new(huge)).is_err());
    }
}
