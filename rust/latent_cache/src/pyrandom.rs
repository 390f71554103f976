//! Python's `random.Random` (MT19937), reproduced draw for draw for the calls SimpleTuner's bucketing makes:
//! `seed(int)`, `randint`, `choice` and `choices(weights=...)`. Follows CPython 3.12 `Modules/_randommodule.c`
//! and `Lib/random.py`.

const N: usize = 624;
const M: usize = 397;

/// A Mersenne Twister in the state `random.seed(seed)` leaves CPython's generator in.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// Same state as `random.seed(seed)` for a non-negative int seed (CPython splits `abs(seed)` into 32-bit words).
    pub fn new(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 { vec![seed as u32] } else { vec![seed as u32, (seed >> 32) as u32] };
        let mut r = PyRandom { mt: [0; N], index: N };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random._randbelow(n)` for 0 < n < 2**32: rejection sampling on `getrandbits(n.bit_length())`.
    fn randbelow(&mut self, n: u64) -> u64 {
        let k = 64 - n.leading_zeros();
        loop {
            let r = u64::from(self.next_u32() >> (32 - k));
            if r < n {
                return r;
            }
        }
    }

    /// `random.randint(0, high)` for high > 0.
    pub fn randint_to(&mut self, high: i64) -> i64 {
        self.randbelow((high + 1) as u64) as i64
    }

    /// Index `random.choice(seq)` picks for a sequence of length `len` > 0.
    pub fn choice_index(&mut self, len: usize) -> usize {
        self.randbelow(len as u64) as usize
    }

    /// `random.random()`: 53-bit float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Index `random.choices(population, weights)[0]` picks (bisect_right over cumulative weights).
    pub fn weighted_index(&mut self, weights: &[f64]) -> usize {
        let mut cum = Vec::with_capacity(weights.len());
        let mut acc = 0.0;
        for w in weights {
            acc += w;
            cum.push(acc);
        }
        let x = self.random() * (acc + 0.0);
        let hi = weights.len() - 1;
        cum[..hi].partition_point(|&c| c <= x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cpython_for_seed_42() {
        // python -c "import random; random.seed(42); print([random.randint(0, 100) for _ in range(5)])"
        let mut r = PyRandom::new(42);
        let v: Vec<i64> = (0..5).map(|_| r.randint_to(100)).collect();
        assert_eq!(v, vec![81, 14, 3, 94, 35]);
        // python -c "import random; random.seed(42); print(random.random())"
        assert_eq!(PyRandom::new(42).random(), 0.6394267984578837);
    }
}
