//! Deterministic pseudo-random numbers (xorshift) for simulated traffic and benchmarks:
//! the same seed gives the same day on every run and machine.

#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator for `seed` (0 is replaced: xorshift would stay at 0).
    pub fn seeded(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.bits() % 1_000_000) as f64 / 1_000_000.0
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.bits() % n as u64) as usize
    }

    pub fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + (self.bits() % 10) as u8))
            .collect()
    }

    /// A count with mean `mean` (Bernoulli-rounded, enough for traffic).
    pub fn count(&mut self, mean: f64) -> usize {
        let base = mean.max(0.0).floor();
        base as usize + usize::from(self.unit() < mean - base)
    }
}
