//! An operator killed (SIGKILL) and started again at seeded random points, for the chaos tests.

use std::time::Duration;

use anneal_e2e::operator::OperatorProcess;
use anyhow::Result;

/// A tiny deterministic generator for the kill points (xorshift64*), seeded from the clock unless
/// `ANNEAL_CHAOS_SEED` pins it; the seed is printed so that a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed: `ANNEAL_CHAOS_SEED`, else the clock.
pub fn seed() -> u64 {
    std::env::var("ANNEAL_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

/// One operator, killed and restarted by a chaos test.
pub struct Chaos {
    /// The namespace the operator watches.
    pub ns: String,
    /// The operator running now.
    pub operator: Option<OperatorProcess>,
    /// Where the kills fall.
    pub rng: Rng,
    /// Each kill's delay (ms) after the action before it.
    pub kills: Vec<u64>,
}

impl Chaos {
    /// SIGKILLs the operator at a random point of the next 1.5 s (the reconcile of what was just
    /// done may not have started, may be half way, or may be over), then starts a new one.
    pub async fn kill_somewhere(&mut self) -> Result<()> {
        let delay = self.rng.below(1500);
        self.kills.push(delay);
        // The random point itself: what is tested is a crash at an arbitrary moment.
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if let Some(operator) = self.operator.take() {
            operator.kill().await?;
        }
        self.operator = Some(OperatorProcess::start(&self.ns).await?);
        Ok(())
    }
}
