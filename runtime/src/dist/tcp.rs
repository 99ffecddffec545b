//! The gang over TCP. Rank 0 listens at the rendezvous address; every other rank opens a ring
//! listener of its own, connects to rank 0 and says who it is ([`Hello`]: job UID, attempt,
//! world size, rank, the digest of its starting state). Rank 0 admits exactly one rank of each
//! number of its own job, attempt and size (others are refused and told why), checks that every
//! digest equals its own, and answers everyone with the peer list. Each rank then connects to
//! its right neighbour and accepts its left one, checking who that is again.
//!
//! Every connection's sender runs on a thread of its own that sends a heartbeat whenever it
//! has had nothing to send for [`Timeouts::heartbeat`]; a receiver that hears nothing for
//! [`Timeouts::peer`] declares the peer lost. A rank busy outside a collective (rank 0 writing
//! a checkpoint) thus keeps its peers waiting, while a dead or frozen one is noticed within the
//! peer timeout, and a closed connection at once.

use super::wire::{self, Kind, read_frame, write_frame};
use super::{DistError, Link, Placement, Ring};
use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Version of the handshake; ranks of another version are refused.
const PROTOCOL: u32 = 1;

/// How long the gang waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For all ranks to arrive and connect (workers start at different times).
    pub rendezvous: Duration,
    /// Silence after which a peer is lost.
    pub peer: Duration,
    /// Idle time after which a sender sends a heartbeat (well below `peer`).
    pub heartbeat: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            rendezvous: Duration::from_secs(300),
            peer: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// Who this rank is and whom it may train with.
#[derive(Debug, Clone)]
pub struct GangSpec {
    /// Rank, world size, rendezvous.
    pub placement: Placement,
    /// The job's UID (or any run identifier shared by the gang).
    pub job_uid: String,
    /// The attempt: ranks of another attempt are refused.
    pub attempt: u64,
    /// Waiting bounds.
    pub timeouts: Timeouts,
    /// Where gradient sums run.
    pub collective: super::Collective,
}

/// A rank's introduction to rank 0.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    protocol: u32,
    job_uid: String,
    attempt: u64,
    world: usize,
    rank: usize,
    ring_port: u16,
    digest: String,
}

/// Rank 0's answer: the ring address of every rank.
#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    peers: Vec<String>,
}

/// A rank's introduction to its right neighbour.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct RingHello {
    job_uid: String,
    attempt: u64,
    rank: usize,
}

fn warn(msg: &str) {
    eprintln!("anneal-runtime: warning: gang: {msg}");
}

/// Joins the gang: returns this rank's end of the ring once every rank has arrived with the
/// same starting `digest`. Rank 0 listens on the rendezvous port, or on `listener` when given
/// (tests bind port 0 and tell the others the port it got).
pub fn join(
    spec: &GangSpec,
    digest: &str,
    listener: Option<TcpListener>,
) -> Result<Ring, DistError> {
    let p = &spec.placement;
    p.validate()?;
    if p.world == 1 {
        return Ok(Ring::solo());
    }
    let deadline = Instant::now() + spec.timeouts.rendezvous;
    let rendezvous = p.rendezvous.clone().unwrap_or_default();
    let (listener, peers) = if p.rank == 0 {
        let listener = match listener {
            Some(l) => l,
            None => {
                let port = rendezvous
                    .rsplit_once(':')
                    .and_then(|(_, port)| port.parse::<u16>().ok())
                    .ok_or_else(|| {
                        DistError::Config(format!("rendezvous {rendezvous:?} is not host:port"))
                    })?;
                TcpListener::bind(("0.0.0.0", port))
                    .map_err(|e| DistError::Config(format!("cannot listen on port {port}: {e}")))?
            }
        };
        let peers = admit(spec, digest, &listener, &rendezvous, deadline)?;
        (listener, peers)
    } else {
        let listener = TcpListener::bind(("0.0.0.0", 0))
            .map_err(|e| DistError::Config(format!("cannot open a ring listener: {e}")))?;
        let peers = arrive(spec, digest, &listener, &rendezvous, deadline)?;
        (listener, peers)
    };
    let (right, left) = connect_ring(spec, &listener, &peers, deadline)?;
    let link = TcpLink::start(right, left, p.rank, p.world, spec.timeouts);
    Ok(Ring::new(p.rank, p.world, Box::new(link)))
}

/// Rank 0: admits one rank of each number, checks the digests, sends the peer list.
fn admit(
    spec: &GangSpec,
    digest: &str,
    listener: &TcpListener,
    rendezvous: &str,
    deadline: Instant,
) -> Result<Vec<String>, DistError> {
    let world = spec.placement.world;
    let mut admitted: Vec<Option<(TcpStream, String, String)>> = (0..world).map(|_| None).collect();
    while admitted.iter().skip(1).any(Option::is_none) {
        let missing: Vec<String> = (1..world)
            .filter(|r| admitted[*r].is_none())
            .map(|r| r.to_string())
            .collect();
        let mut s = accept_until(listener, deadline, || {
            format!(
                "rank(s) {} did not arrive at the rendezvous",
                missing.join(", ")
            )
        })?;
        let _ = s.set_read_timeout(Some(spec.timeouts.peer));
        let hello = match read_frame(&mut s) {
            Ok(f) if f.kind == Kind::Hello => serde_json::from_slice::<Hello>(&f.payload).ok(),
            _ => None,
        };
        let Some(hello) = hello else {
            warn("a connection to the rendezvous sent no valid hello; ignored");
            continue;
        };
        let problem = if hello.protocol != PROTOCOL {
            Some(format!(
                "protocol {} (rank 0 speaks {PROTOCOL})",
                hello.protocol
            ))
        } else if hello.job_uid != spec.job_uid || hello.attempt != spec.attempt {
            Some(format!(
                "job {} attempt {} (rank 0 is of job {} attempt {})",
                hello.job_uid, hello.attempt, spec.job_uid, spec.attempt
            ))
        } else if hello.world != world {
            Some(format!("world size {} (rank 0's is {world})", hello.world))
        } else if hello.rank == 0 || hello.rank >= world {
            Some(format!("rank {} out of 1..{world}", hello.rank))
        } else if admitted[hello.rank].is_some() {
            Some(format!("rank {} arrived twice", hello.rank))
        } else {
            None
        };
        if let Some(problem) = problem {
            warn(&format!("refused a rank: {problem}"));
            let _ = write_frame(&mut s, Kind::Reject, 0, problem.as_bytes());
            continue;
        }
        let ip = s
            .peer_addr()
            .map_err(|e| DistError::PeerLost(format!("rank {}: {e}", hello.rank)))?
            .ip();
        let addr = SocketAddr::new(ip, hello.ring_port).to_string();
        admitted[hello.rank] = Some((s, addr, hello.digest));
    }
    let differing: Vec<String> = admitted
        .iter()
        .enumerate()
        .filter_map(|(r, a)| a.as_ref().map(|a| (r, &a.2)))
        .filter(|(_, d)| d.as_str() != digest)
        .map(|(r, d)| format!("rank {r} has {d}"))
        .collect();
    if !differing.is_empty() {
        let why = format!(
            "rank 0 has {digest}, {}: every worker must resume the same checkpoint (a checkpoint volume that all workers share, ReadWriteMany) and build the same model",
            differing.join(", ")
        );
        for (s, _, _) in admitted.iter_mut().flatten() {
            let _ = write_frame(s, Kind::Reject, 0, why.as_bytes());
        }
        return Err(DistError::StateMismatch(why));
    }
    let mut peers = vec![rendezvous.to_string()];
    peers.extend(admitted.iter().skip(1).flatten().map(|a| a.1.clone()));
    let welcome = serde_json::to_vec(&Welcome {
        peers: peers.clone(),
    })
    .unwrap_or_default();
    for (rank, (s, _, _)) in admitted
        .iter_mut()
        .enumerate()
        .filter_map(|(r, a)| Some((r, a.as_mut()?)))
    {
        write_frame(s, Kind::Welcome, 0, &welcome)
            .map_err(|e| wire::link_error(&format!("rank {rank}"), &e, spec.timeouts.peer))?;
    }
    Ok(peers)
}

/// Rank > 0: introduces itself to rank 0 and waits for the peer list.
fn arrive(
    spec: &GangSpec,
    digest: &str,
    listener: &TcpListener,
    rendezvous: &str,
    deadline: Instant,
) -> Result<Vec<String>, DistError> {
    let p = &spec.placement;
    let ring_port = listener
        .local_addr()
        .map_err(|e| DistError::Config(e.to_string()))?
        .port();
    let mut s = connect_until(rendezvous, deadline, "rank 0's rendezvous")?;
    let hello = Hello {
        protocol: PROTOCOL,
        job_uid: spec.job_uid.clone(),
        attempt: spec.attempt,
        world: p.world,
        rank: p.rank,
        ring_port,
        digest: digest.to_string(),
    };
    let lost = |e: std::io::Error| {
        if wire::is_timeout(&e) {
            DistError::PeerLost(format!(
                "rank 0 did not admit this rank within {:?}",
                spec.timeouts.rendezvous
            ))
        } else {
            DistError::PeerLost(format!("rank 0: {e}"))
        }
    };
    write_frame(
        &mut s,
        Kind::Hello,
        0,
        &serde_json::to_vec(&hello).unwrap_or_default(),
    )
    .map_err(lost)?;
    let _ = s.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ));
    let frame = read_frame(&mut s).map_err(lost)?;
    match frame.kind {
        Kind::Welcome => {
            let w: Welcome = serde_json::from_slice(&frame.payload)
                .map_err(|e| DistError::Protocol(format!("welcome: {e}")))?;
            if w.peers.len() != p.world {
                return Err(DistError::Protocol(format!(
                    "{} peers for world size {}",
                    w.peers.len(),
                    p.world
                )));
            }
            Ok(w.peers)
        }
        Kind::Reject => {
            let why = String::from_utf8_lossy(&frame.payload).into_owned();
            if why.contains("every worker must resume the same checkpoint") {
                Err(DistError::StateMismatch(why))
            } else {
                Err(DistError::Refused(format!(
                    "rank 0 refused this rank: {why}"
                )))
            }
        }
        other => Err(DistError::Protocol(format!("rank 0 answered {other:?}"))),
    }
}

/// Connects to the right neighbour and accepts the left one.
fn connect_ring(
    spec: &GangSpec,
    listener: &TcpListener,
    peers: &[String],
    deadline: Instant,
) -> Result<(TcpStream, TcpStream), DistError> {
    let (rank, world) = (spec.placement.rank, spec.placement.world);
    let (right_rank, left_rank) = ((rank + 1) % world, (rank + world - 1) % world);
    let mut right = connect_until(
        &peers[right_rank],
        deadline,
        &format!("rank {right_rank}'s ring listener"),
    )?;
    let me = RingHello {
        job_uid: spec.job_uid.clone(),
        attempt: spec.attempt,
        rank,
    };
    write_frame(
        &mut right,
        Kind::RingHello,
        0,
        &serde_json::to_vec(&me).unwrap_or_default(),
    )
    .map_err(|e| wire::link_error(&format!("rank {right_rank}"), &e, spec.timeouts.peer))?;
    let expected = RingHello {
        rank: left_rank,
        ..me
    };
    loop {
        let mut s = accept_until(listener, deadline, || {
            format!("rank {left_rank} did not connect to this rank")
        })?;
        let _ = s.set_read_timeout(Some(spec.timeouts.peer));
        let hello = match read_frame(&mut s) {
            Ok(f) if f.kind == Kind::RingHello => {
                serde_json::from_slice::<RingHello>(&f.payload).ok()
            }
            _ => None,
        };
        if hello.as_ref() == Some(&expected) {
            return Ok((right, s));
        }
        let why = format!("expected the ring hello of {expected:?}, got {hello:?}");
        warn(&why);
        let _ = write_frame(&mut s, Kind::Reject, 0, why.as_bytes());
    }
}

fn connect_until(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream, DistError> {
    let mut last = String::from("not tried");
    loop {
        // Resolved again on every try: a headless Service's name appears once the pod is ready
        // to be addressed, which may be after this worker started.
        match addr.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(s);
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(DistError::PeerLost(format!(
                "{what} at {addr} not reachable before the rendezvous deadline: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
    why: impl Fn() -> String,
) -> Result<TcpStream, DistError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| DistError::Config(e.to_string()))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err(DistError::PeerLost(why()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(DistError::PeerLost(format!("accept: {e}"))),
        }
    }
}

enum Out {
    Data(Vec<u8>),
    Abort(String),
}

/// Both neighbours over TCP: a sender thread (data, heartbeats, abort) to the right, reads with
/// the peer timeout from the left.
struct TcpLink {
    tx: Sender<Out>,
    sender_done: Receiver<()>,
    failed: Arc<Mutex<Option<String>>>,
    left: TcpStream,
    left_rank: usize,
    expected: u64,
    peer_timeout: Duration,
}

impl TcpLink {
    fn start(
        right: TcpStream,
        left: TcpStream,
        rank: usize,
        world: usize,
        timeouts: Timeouts,
    ) -> Self {
        let right_rank = (rank + 1) % world;
        let (tx, rx) = channel::<Out>();
        let (done_tx, sender_done) = channel();
        let failed = Arc::new(Mutex::new(None));
        let failed_w = failed.clone();
        let _ = right.set_write_timeout(Some(timeouts.peer));
        let _ = left.set_read_timeout(Some(timeouts.peer));
        std::thread::Builder::new()
            .name(format!("gang-send-{right_rank}"))
            .spawn(move || {
                let mut right = right;
                let mut seq = 0u64;
                loop {
                    let result = match rx.recv_timeout(timeouts.heartbeat) {
                        Ok(Out::Data(payload)) => {
                            seq += 1;
                            write_frame(&mut right, Kind::Data, seq, &payload)
                        }
                        Ok(Out::Abort(why)) => {
                            let _ = write_frame(&mut right, Kind::Abort, 0, why.as_bytes());
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            write_frame(&mut right, Kind::Heartbeat, 0, &[])
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if let Err(e) = result {
                        let err =
                            wire::link_error(&format!("rank {right_rank}"), &e, timeouts.peer);
                        if let Ok(mut f) = failed_w.lock() {
                            *f = Some(err.to_string());
                        }
                        break;
                    }
                }
                let _ = right.shutdown(std::net::Shutdown::Both);
                let _ = done_tx.send(());
            })
            .expect("spawn the gang's sender thread");
        Self {
            tx,
            sender_done,
            failed,
            left,
            left_rank: (rank + world - 1) % world,
            expected: 1,
            peer_timeout: timeouts.peer,
        }
    }

    fn sender_failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
}

impl Link for TcpLink {
    fn send(&mut self, payload: Vec<u8>) -> Result<(), DistError> {
        if let Some(why) = self.sender_failure() {
            return Err(DistError::PeerLost(why));
        }
        self.tx
            .send(Out::Data(payload))
            .map_err(|_| DistError::PeerLost(self.sender_failure().unwrap_or_default()))
    }

    fn recv(&mut self) -> Result<Vec<u8>, DistError> {
        let peer = format!("rank {}", self.left_rank);
        loop {
            let frame = read_frame(&mut self.left)
                .map_err(|e| wire::link_error(&peer, &e, self.peer_timeout))?;
            match frame.kind {
                Kind::Heartbeat => continue,
                Kind::Data if frame.seq == self.expected => {
                    self.expected += 1;
                    return Ok(frame.payload);
                }
                Kind::Data => {
                    return Err(DistError::Protocol(format!(
                        "{peer} sent frame {} where {} was due",
                        frame.seq, self.expected
                    )));
                }
                Kind::Abort => {
                    return Err(DistError::PeerLost(format!(
                        "{peer} aborted: {}",
                        String::from_utf8_lossy(&frame.payload)
                    )));
                }
                other => return Err(DistError::Protocol(format!("{peer} sent {other:?}"))),
            }
        }
    }

    fn abort(&mut self, reason: &str) {
        if self.tx.send(Out::Abort(reason.to_string())).is_ok() {
            // Give the abort a moment to leave before the process may end.
            let _ = self.sender_done.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.left.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        // What is queued for the right neighbour leaves before the connection closes: when a
        // gang's final barrier returns, this rank's last message may still be in the queue, and
        // a process that ended with it there would leave its neighbour waiting for it (and then
        // failing the attempt). The sender thread drains the queue, then closes.
        drop(std::mem::replace(&mut self.tx, channel().0));
        let _ = self.sender_done.recv_timeout(self.peer_timeout);
        let _ = self.left.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: usize, world: usize, port: u16, peer: Duration) -> GangSpec {
        GangSpec {
            collective: Default::default(),
            placement: Placement {
                rank,
                world,
                rendezvous: Some(format!("127.0.0.1:{port}")),
            },
            job_uid: "uid-1".into(),
            attempt: 3,
            timeouts: Timeouts {
                rendezvous: Duration::from_secs(20),
                peer,
                heartbeat: Duration::from_millis(100),
            },
        }
    }

    /// Runs `f` on every rank of a TCP gang of `world` on loopback.
    fn gang<T: Send + 'static>(
        world: usize,
        peer: Duration,
        digest: impl Fn(usize) -> String,
        f: impl Fn(Result<Ring, DistError>) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut listener = Some(listener);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (f, d, l) = (f.clone(), digest(rank), listener.take());
                std::thread::spawn(move || f(join(&spec(rank, world, port, peer), &d, l)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_over_tcp_is_the_sum_for_odd_sizes_and_worlds_of_one_to_four() {
        for world in 1..=4 {
            let outs = gang(
                world,
                Duration::from_secs(5),
                |_| "d".into(),
                move |ring| {
                    let mut ring = ring.unwrap();
                    let mut results = Vec::new();
                    for n in [1usize, 3, 1001, 100_003] {
                        let mut buf: Vec<f32> =
                            (0..n).map(|i| ((i % 1000) + ring.rank()) as f32).collect();
                        ring.all_reduce_sum(&mut buf).unwrap();
                        results.push(buf);
                    }
                    results
                },
            );
            for results in &outs {
                for buf in results {
                    for (i, x) in buf.iter().enumerate() {
                        let want: usize = (0..world).map(|r| i % 1000 + r).sum();
                        assert_eq!(*x, want as f32, "world {world} n {} i {i}", buf.len());
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_of_another_state_are_refused_at_the_handshake() {
        let outs = gang(
            3,
            Duration::from_secs(5),
            |r| if r == 2 { "other".into() } else { "d".into() },
            |ring| ring.map(|_| ()),
        );
        for out in outs {
            assert!(matches!(out, Err(DistError::StateMismatch(_))), "{out:?}");
        }
    }

    #[test]
    fn a_stale_attempt_is_refused_and_the_gang_still_forms() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rank0 = std::thread::spawn(move || {
            let mut ring = join(
                &spec(0, 2, port, Duration::from_secs(5)),
                "d",
                Some(listener),
            )?;
            ring.all_reduce_sum(&mut [1f32])
        });
        let mut stale = spec(1, 2, port, Duration::from_secs(5));
        stale.attempt = 2;
        let err = join(&stale, "d", None).map(|_| ()).unwrap_err();
        assert!(
            matches!(err, DistError::Refused(ref m) if m.contains("attempt 2")),
            "{err}"
        );
        let mut ring = join(&spec(1, 2, port, Duration::from_secs(5)), "d", None).unwrap();
        ring.all_reduce_sum(&mut [1f32]).unwrap();
        rank0.join().unwrap().unwrap();
    }

    #[test]
    fn a_peer_gone_mid_collective_fails_the_gang_within_the_timeout() {
        // Rank 2 closes its connections after the first collective; rank 3 freezes (it keeps
        // its sockets but stops sending, heartbeats included, like a node that vanished).
        let start = Instant::now();
        let outs = gang(
            4,
            Duration::from_secs(2),
            |_| "d".into(),
            |ring| {
                let mut ring = ring.unwrap();
                let mut buf = vec![1f32; 10_000];
                ring.all_reduce_sum(&mut buf)?;
                if ring.rank() == 2 {
                    drop(ring);
                    return Ok(Duration::ZERO);
                }
                let t = Instant::now();
                let out = ring.all_reduce_sum(&mut buf);
                out.map(|_| t.elapsed())
            },
        );
        assert!(outs[2].is_ok());
        for (rank, out) in outs.iter().enumerate().filter(|(r, _)| *r != 2) {
            assert!(
                matches!(out, Err(DistError::PeerLost(_))),
                "rank {rank}: {out:?}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_frozen_peer_is_lost_after_the_peer_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = Duration::from_millis(1500);
        let rank0 = std::thread::spawn(move || {
            let mut ring = join(&spec(0, 2, port, peer), "d", Some(listener)).unwrap();
            ring.all_reduce_sum(&mut [1f32, 1.0]).unwrap();
            let t = Instant::now();
            let err = ring.all_reduce_sum(&mut [1f32, 1.0]).unwrap_err();
            (err, t.elapsed())
        });
        // A hand-made rank 1: joins properly, takes part in one collective, then holds its
        // sockets open and sends nothing at all (no heartbeat: a frozen process or a dead node).
        let s = spec(1, 2, port, peer);
        let ring_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = arrive(
            &s,
            "d",
            &ring_listener,
            &format!("127.0.0.1:{port}"),
            Instant::now() + Duration::from_secs(10),
        )
        .unwrap();
        let (mut right, mut left) = connect_ring(
            &s,
            &ring_listener,
            &peers,
            Instant::now() + Duration::from_secs(10),
        )
        .unwrap();
        write_frame(&mut right, Kind::Data, 1, &1f32.to_le_bytes()).unwrap();
        let got = loop {
            let f = read_frame(&mut left).unwrap();
            if f.kind == Kind::Data {
                break f;
            }
        };
        assert_eq!(got.seq, 1);
        // One step of a 2-rank ring each way: the reduce-scatter's and the all-gather's.
        write_frame(&mut right, Kind::Data, 2, &2f32.to_le_bytes()).unwrap();
        let (err, waited) = rank0.join().unwrap();
        assert!(
            matches!(err, DistError::PeerLost(ref m) if m.contains("sent nothing")),
            "{err}"
        );
        assert!(waited >= peer && waited < peer * 3, "{waited:?}");
        drop((right, left));
    }
}
