//! The CPU ring all-reduce between two local processes against the loopback limit, measured in
//! the same run: prints a table; not a test.
//!
//! ```text
//! runtime/benches/dist/allreduce-bench.sh      # cargo bench -p anneal-runtime --bench dist-allreduce
//! ```
//!
//! The bench starts itself twice (rank 0 and rank 1, joined through the real rendezvous on
//! loopback) and, for gradient-sized buffers of f32:
//! - `tcp one way`: rank 0 writes the buffer's bytes on a plain TCP connection, rank 1 reads
//!   them all and answers one byte; bytes / time.
//! - `tcp both ways`: both ranks write the buffer's bytes to each other at once and read the
//!   other's; bytes / time per direction. A ring of two sends and receives the whole buffer in
//!   each direction at once (half in reduce-scatter, half in all-gather): this is its limit.
//! - `all-reduce`: `Ring::all_reduce_sum`; bus bandwidth = bytes x 2(n-1)/n / time (NCCL's
//!   definition; for n = 2 it is bytes / time), comparable with the lines above.
//! - `per step`: what the trainer adds to a step, `train::gang::sum_gradients` on tensors of the
//!   model's parameter count (flatten, all-reduce, rebuild) plus the loss/token sums.
//!
//! Medians of `ITERS` (default 10) timed runs after two warm-ups.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anneal_runtime::dist::{GangSpec, Placement, Ring, Timeouts, tcp};
use anneal_runtime::train::gang::{sum_gradients, sum_stats};
use candle_core::{Device, Tensor};

const SIZES: [usize; 4] = [1 << 16, 1 << 20, 10 << 20, 25 << 20];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rank") {
        let rank: usize = args[i + 1].parse().expect("rank");
        let port: u16 = args[i + 2].parse().expect("port");
        rank_main(rank, port);
        return;
    }
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("port").port()
    };
    let exe = std::env::current_exe().expect("own path");
    let mut children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(["--rank", &rank.to_string(), &port.to_string()])
                .spawn()
                .expect("start a rank")
        })
        .collect();
    for c in &mut children {
        assert!(c.wait().expect("rank ends").success(), "a rank failed");
    }
}

fn iters() -> usize {
    std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Times `f` (after two warm-ups) with a barrier before each run, so both ranks start together.
fn timed(ring: &mut Ring, mut f: impl FnMut(&mut Ring)) -> Duration {
    for _ in 0..2 {
        ring.barrier().expect("barrier");
        f(ring);
    }
    let times = (0..iters())
        .map(|_| {
            ring.barrier().expect("barrier");
            let t = Instant::now();
            f(ring);
            t.elapsed()
        })
        .collect();
    median(times)
}

fn rank_main(rank: usize, port: u16) {
    // Rank 1 listens for the plain TCP copies on the next port.
    let copy_listener = (rank == 1)
        .then(|| TcpListener::bind(("127.0.0.1", port + 1)).expect("copy listener on port + 1"));
    let spec = GangSpec {
        collective: Default::default(),
        placement: Placement {
            rank,
            world: 2,
            rendezvous: Some(format!("127.0.0.1:{port}")),
        },
        job_uid: "bench".into(),
        attempt: 0,
        timeouts: Timeouts::default(),
    };
    let mut ring = tcp::join(&spec, "bench", None).expect("join the gang");
    let mut copy = match copy_listener {
        Some(l) => l.accept().expect("copy connection").0,
        None => TcpStream::connect(("127.0.0.1", port + 1)).expect("copy connection"),
    };
    copy.set_nodelay(true).expect("nodelay");
    let mut rows = Vec::new();
    for &n in &SIZES {
        let bytes = n * 4;
        let payload = vec![7u8; bytes];
        let mut sink = vec![0u8; bytes];
        let one_way = timed(&mut ring, |_| {
            if rank == 0 {
                copy.write_all(&payload).expect("write");
                copy.read_exact(&mut sink[..1]).expect("ack");
            } else {
                copy.read_exact(&mut sink).expect("read");
                copy.write_all(&[1]).expect("ack");
            }
        });
        let both = timed(&mut ring, |_| {
            let mut writer = copy.try_clone().expect("clone");
            let payload = &payload;
            std::thread::scope(|s| {
                s.spawn(move || writer.write_all(payload).expect("write"));
                copy.read_exact(&mut sink).expect("read");
            });
        });
        let mut buf = vec![1f32; n];
        let reduce = timed(&mut ring, |r| {
            r.all_reduce_sum(&mut buf).expect("all-reduce")
        });
        rows.push((n, one_way, both, reduce));
    }
    // What a step adds: gradients of a model with P parameters in a handful of tensors.
    let mut steps = Vec::new();
    for params in [1_000_000usize, 10_000_000] {
        let shapes = [
            params / 2,
            params / 4,
            params / 8,
            params - params / 2 - params / 4 - params / 8,
        ];
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|&k| Tensor::ones(k, candle_core::DType::F32, &Device::Cpu).expect("tensor"))
            .collect();
        let t = timed(&mut ring, |r| {
            let summed = sum_gradients(r, grads.clone()).expect("gradients");
            sum_stats(r, &mut [1.0, 10.0, 20.0]).expect("counts");
            assert_eq!(summed.len(), grads.len());
        });
        steps.push((params, t));
    }
    if rank != 0 {
        return;
    }
    let gbs = |bytes: usize, t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
    println!(
        "| buffer (f32) | bytes | tcp one way GB/s | tcp both ways GB/s per direction | all-reduce ms | all-reduce bus GB/s | bus / both-ways |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (n, one, both, reduce) in rows {
        let bytes = n * 4;
        let bus = gbs(bytes, reduce); // 2(n-1)/n = 1 for two ranks
        println!(
            "| {n} | {:.1} MB | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            bytes as f64 / 1e6,
            gbs(bytes, one),
            gbs(bytes, both),
            reduce.as_secs_f64() * 1e3,
            bus,
            bus / gbs(bytes, both)
        );
    }
    println!();
    println!("| parameters | time added per step (sum_gradients + sum_stats), ms |");
    println!("| --- | --- |");
    for (params, t) in steps {
        println!("| {params} | {:.1} |", t.as_secs_f64() * 1e3);
    }
}
