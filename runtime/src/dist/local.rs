//! The in-process transport: the ranks of a ring are threads of one process joined by channels.
//! For unit tests of the ring and of code that runs collectives; a rank whose end is dropped is
//! a vanished peer, as a closed socket would be.

use super::{DistError, Link, Ring};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

enum Msg {
    Data(Vec<u8>),
    Abort(String),
}

struct LocalLink {
    right: Sender<Msg>,
    left: Receiver<Msg>,
    timeout: Duration,
}

impl Link for LocalLink {
    fn send(&mut self, payload: Vec<u8>) -> Result<(), DistError> {
        self.right
            .send(Msg::Data(payload))
            .map_err(|_| DistError::PeerLost("right neighbour is gone".into()))
    }

    fn recv(&mut self) -> Result<Vec<u8>, DistError> {
        match self.left.recv_timeout(self.timeout) {
            Ok(Msg::Data(bytes)) => Ok(bytes),
            Ok(Msg::Abort(why)) => Err(DistError::PeerLost(format!("aborted: {why}"))),
            Err(RecvTimeoutError::Timeout) => Err(DistError::PeerLost(format!(
                "left neighbour sent nothing for {:?}",
                self.timeout
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(DistError::PeerLost("left neighbour is gone".into()))
            }
        }
    }

    fn abort(&mut self, reason: &str) {
        let _ = self.right.send(Msg::Abort(reason.to_string()));
    }
}

/// The `world` ends of one ring, rank 0 first; a receive waits at most `timeout`.
pub fn ring(world: usize, timeout: Duration) -> Vec<Ring> {
    if world <= 1 {
        return vec![Ring::solo()];
    }
    // Channel i carries rank i's sends to rank i + 1.
    let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| channel()).unzip();
    receivers.rotate_right(1);
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (right, left))| {
            let link = LocalLink {
                right,
                left,
                timeout,
            };
            Ring::new(rank, world, Box::new(link))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn run<T: Send + 'static>(
        rings: Vec<Ring>,
        f: impl Fn(Ring) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = rings
            .into_iter()
            .map(|r| {
                let f = f.clone();
                std::thread::spawn(move || f(r))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_is_the_sum_for_odd_sizes_and_worlds_of_one_to_four() {
        for world in 1..=4 {
            for n in [0usize, 1, 3, 7, 1001] {
                let outs = run(ring(world, Duration::from_secs(10)), move |mut r| {
                    // Integer values: every summation order gives the exact sum.
                    let mut buf: Vec<f32> = (0..n).map(|i| (i * 7 + r.rank() * 3) as f32).collect();
                    r.all_reduce_sum(&mut buf).unwrap();
                    let mut counts = vec![r.rank() as f64, 1.0];
                    r.all_reduce_sum(&mut counts).unwrap();
                    (buf, counts)
                });
                let want: Vec<f32> = (0..n)
                    .map(|i| (0..world).map(|r| (i * 7 + r * 3) as f32).sum())
                    .collect();
                for (buf, counts) in outs {
                    assert_eq!(buf, want, "world {world}, n {n}");
                    assert_eq!(counts, [(world * (world - 1) / 2) as f64, world as f64]);
                }
            }
        }
    }

    #[test]
    fn every_rank_gets_the_same_bits_in_a_fixed_order() {
        // Values whose sums round differently in different orders: the result must still be the
        // same on every rank and on every repetition.
        let outs = run(ring(3, Duration::from_secs(10)), |mut r| {
            let mut rng = Rng::new(r.rank() as u64, 1);
            let base: Vec<f32> = (0..257)
                .map(|_| (rng.next_f64() * 1e3 - 5e2) as f32)
                .collect();
            let mut a = base.clone();
            r.all_reduce_sum(&mut a).unwrap();
            let mut b = base;
            r.all_reduce_sum(&mut b).unwrap();
            (a, b)
        });
        for (a, b) in &outs {
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(a, &outs[0].0);
        }
    }

    #[test]
    fn a_rank_gone_mid_collective_fails_every_other_rank_within_the_timeout() {
        let start = std::time::Instant::now();
        let outs = run(ring(4, Duration::from_secs(2)), |mut r| {
            let mut buf = vec![1f32; 100];
            r.all_reduce_sum(&mut buf)?;
            if r.rank() == 2 {
                // Vanishes (its channel ends are dropped) before the second collective.
                return Ok(());
            }
            r.all_reduce_sum(&mut buf)?;
            Ok::<(), DistError>(())
        });
        assert!(outs[2].is_ok());
        for (rank, out) in outs.iter().enumerate().filter(|(r, _)| *r != 2) {
            assert!(
                matches!(out, Err(DistError::PeerLost(_))),
                "rank {rank}: {out:?}"
            );
        }
        assert!(start.elapsed() < Duration::from_secs(2) * 3);
    }
}
