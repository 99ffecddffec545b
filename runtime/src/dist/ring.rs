//! The ring all-reduce: reduce-scatter then all-gather over `world - 1` steps each, every rank
//! sending to its right neighbour and receiving from its left one.
//!
//! The buffer is cut into `world` chunks. In reduce-scatter step `s`, rank `r` sends its partial
//! sum of chunk `r - s` and adds what it receives to chunk `r - s - 1`; chunk `c` is thus summed
//! in the order `x[c], x[c+1], ..., x[c-1]` (ranks around the ring), the same on every call.
//! After the last step rank `r` holds the total of chunk `r + 1`, and all-gather passes the
//! totals around unchanged: every rank ends with the same bits.

use super::DistError;

/// A connection to both ring neighbours.
pub trait Link: Send {
    /// Queues `payload` for the right neighbour. Must not wait for the neighbour to receive it:
    /// every rank sends before it receives.
    fn send(&mut self, payload: Vec<u8>) -> Result<(), DistError>;
    /// The next data payload from the left neighbour.
    fn recv(&mut self) -> Result<Vec<u8>, DistError>;
    /// Tells the right neighbour, best effort, that this rank gives up (so that the failure
    /// travels around the ring at once instead of after a timeout).
    fn abort(&mut self, reason: &str);
}

/// An element type the ring sums.
pub trait Elem: Copy + std::ops::Add<Output = Self> + Send + 'static {
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads from exactly [`Self::SIZE`] little-endian bytes.
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! elem {
    ($t:ty) => {
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().unwrap_or_default())
            }
        }
    };
}
elem!(f32);
elem!(f64);

/// One rank's end of the ring.
pub struct Ring {
    rank: usize,
    world: usize,
    link: Option<Box<dyn Link>>,
    /// Set after the first failure: the ring cannot be used again.
    broken: Option<String>,
    /// The gang's sums of accelerator tensors, when a device transport joined ([`Self::attach`]).
    device: Option<Box<dyn super::DeviceReduce>>,
}

/// Bounds of chunk `c` of `n` elements cut into `world` chunks (sizes differ by at most one).
fn chunk(n: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    (c * n / world)..((c + 1) * n / world)
}

impl Ring {
    /// A ring of one rank: collectives return their input.
    pub fn solo() -> Self {
        Self {
            rank: 0,
            world: 1,
            link: None,
            broken: None,
            device: None,
        }
    }

    /// Rank `rank` of `world` over `link`.
    pub fn new(rank: usize, world: usize, link: Box<dyn Link>) -> Self {
        Self {
            rank,
            world,
            link: Some(link),
            broken: None,
            device: None,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the ring.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums of accelerator tensors go through `device` from now on.
    pub fn attach(&mut self, device: Box<dyn super::DeviceReduce>) {
        self.device = Some(device);
    }

    /// The device transport attached, if any.
    pub fn device(&self) -> Option<&dyn super::DeviceReduce> {
        self.device.as_deref()
    }

    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf` (which must
    /// have the same length everywhere; a difference is detected as a protocol error). On
    /// failure every other rank fails too, and this ring refuses further use.
    pub fn all_reduce_sum<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), DistError> {
        if let Some(why) = &self.broken {
            return Err(DistError::PeerLost(format!(
                "the gang already failed: {why}"
            )));
        }
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let result = ring_all_reduce(link.as_mut(), self.rank, self.world, buf);
        if let Err(e) = &result {
            link.abort(&format!("rank {}: {e}", self.rank));
            self.broken = Some(e.to_string());
        }
        result
    }

    /// Returns when every rank has called it (an all-reduce of one number).
    pub fn barrier(&mut self) -> Result<(), DistError> {
        self.all_reduce_sum(&mut [0f32])
    }
}

fn ring_all_reduce<T: Elem>(
    link: &mut dyn Link,
    rank: usize,
    world: usize,
    buf: &mut [T],
) -> Result<(), DistError> {
    let n = buf.len();
    let at = |step: usize, back: usize| (rank + world * 2 - step - back) % world;
    let encode = |part: &[T]| {
        let mut out = Vec::with_capacity(part.len() * T::SIZE);
        for &x in part {
            x.put(&mut out);
        }
        out
    };
    let check = |bytes: &[u8], range: &std::ops::Range<usize>| {
        if bytes.len() == range.len() * T::SIZE {
            Ok(())
        } else {
            Err(DistError::Protocol(format!(
                "received {} bytes for a chunk of {} elements: ranks reduce buffers of different sizes",
                bytes.len(),
                range.len()
            )))
        }
    };
    for step in 0..world - 1 {
        link.send(encode(&buf[chunk(n, world, at(step, 0))]))?;
        let range = chunk(n, world, at(step, 1));
        let bytes = link.recv()?;
        check(&bytes, &range)?;
        for (x, b) in buf[range].iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
            *x = T::get(b) + *x;
        }
    }
    for step in 0..world - 1 {
        link.send(encode(
            &buf[chunk(n, world, (rank + 1 + world - step) % world)],
        ))?;
        let range = chunk(n, world, at(step, 0));
        let bytes = link.recv()?;
        check(&bytes, &range)?;
        for (x, b) in buf[range].iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
            *x = T::get(b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for n in [0, 1, 5, 7, 100] {
            for world in 1..=4 {
                let ranges: Vec<_> = (0..world).map(|c| chunk(n, world, c)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[world - 1].end, n);
                assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }
}
