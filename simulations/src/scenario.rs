//! What goes wrong in a simulated federation, drawn from the seed.
//!
//! Every draw is a pure function of (experiment seed, purpose, round,
//! member), never of the order in which members happen to run, so a
//! scenario replays exactly. Per round: which members take part
//! (`participation`), which of those go silent (`dropout`), and how late
//! each one's shares leave (`delay`, the straggler model). Once per run:
//! which members are Byzantine, and how they corrupt the logits they share
//! ([`Attack`]). Link `latency` and `bandwidth` turn a share's size into an
//! arrival time on the in-memory network's simulated clock; a share that
//! arrives after the `deadline` is ignored by its receiver.

use fd_protocol::digest::sha256;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A seeded stream for one purpose, independent of every other stream.
pub fn stream(seed: u64, purpose: &str, round: u64, member: u64) -> ChaCha8Rng {
    let digest =
        sha256(format!("fd-sim {purpose} seed={seed} round={round} member={member}").as_bytes());
    ChaCha8Rng::from_seed(digest.0)
}

/// How long a member's shares wait before leaving (straggling), in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Delay {
    #[default]
    None,
    Constant {
        seconds: f64,
    },
    Uniform {
        min: f64,
        max: f64,
    },
    Exponential {
        mean: f64,
    },
}

impl Delay {
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        match *self {
            Delay::None => 0.0,
            Delay::Constant { seconds } => seconds,
            Delay::Uniform { min, max } => min + (max - min) * rng.random::<f64>(),
            // Inverse CDF; 1 − u avoids ln(0).
            Delay::Exponential { mean } => -mean * (1.0 - rng.random::<f64>()).ln(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        match *self {
            Delay::None => Ok(()),
            Delay::Constant { seconds } if ok(seconds) => Ok(()),
            Delay::Uniform { min, max } if ok(min) && ok(max) && min <= max => Ok(()),
            Delay::Exponential { mean } if ok(mean) => Ok(()),
            other => Err(format!(
                "needs finite, non-negative seconds (min ≤ max), got {other:?}"
            )),
        }
    }
}

/// How a Byzantine member corrupts the logits it shares.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Attack {
    /// Gaussian noise of the logits' own spread, fresh every round.
    #[default]
    Random,
    /// Class c's logit is reported as class (C − 1 − c)'s: confident and wrong.
    LabelFlip,
    /// Every logit multiplied by `factor` (negative flips the ranking).
    Scaled { factor: f32 },
    /// Every sample claims `class` with a large margin.
    ConstantClass { class: usize },
}

impl Attack {
    /// Rewrites `logits` (rows × `classes`) in place.
    pub fn apply(&self, logits: &mut [f32], classes: usize, rng: &mut impl Rng) {
        match *self {
            Attack::Random => {
                let n = logits.len().max(1) as f32;
                let mean = logits.iter().sum::<f32>() / n;
                let spread = (logits.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n)
                    .sqrt()
                    .max(1.0);
                for x in logits.iter_mut() {
                    let normal: f32 = rng.sample(rand_distr::StandardNormal);
                    *x = normal * spread * 3.0;
                }
            }
            Attack::LabelFlip => {
                for row in logits.chunks_mut(classes) {
                    row.reverse();
                }
            }
            Attack::Scaled { factor } => logits.iter_mut().for_each(|x| *x *= factor),
            Attack::ConstantClass { class } => {
                for row in logits.chunks_mut(classes) {
                    row.fill(0.0);
                    if let Some(x) = row.get_mut(class) {
                        *x = 20.0;
                    }
                }
            }
        }
    }
}

/// The `[scenario]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default = "one")]
    pub participation: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_deadline")]
    pub deadline: f64,
    #[serde(default)]
    pub delay: Delay,
    #[serde(default)]
    pub latency: f64,
    #[serde(default)]
    pub bandwidth: f64,
    #[serde(default)]
    pub byzantine: f64,
    #[serde(default)]
    pub attack: Attack,
    /// Fraction of the expected peer shares that must have been accepted
    /// when a member's round closes for it to distil (fd-node's
    /// `federation.quorum`, whose default is 0.5); below it the member keeps
    /// its locally trained student. Default 0: distil whatever arrived, so
    /// dropout experiments measure how the teacher degrades.
    #[serde(default)]
    pub quorum: f64,
}

fn one() -> f64 {
    1.0
}
fn default_deadline() -> f64 {
    60.0
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            participation: 1.0,
            dropout: 0.0,
            deadline: default_deadline(),
            delay: Delay::None,
            latency: 0.0,
            bandwidth: 0.0,
            byzantine: 0.0,
            attack: Attack::Random,
            quorum: 0.0,
        }
    }
}

/// Who does what in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDraw {
    /// Members picked for the round, ascending.
    pub picked: Vec<usize>,
    /// Picked members that go silent (no share, no distillation), ascending.
    pub dropped: Vec<usize>,
    /// Per member: seconds its shares wait before leaving (0 for members not picked).
    pub delays: Vec<f64>,
}

impl RoundDraw {
    /// Picked and not dropped: the members that compute and share.
    pub fn active(&self) -> Vec<usize> {
        self.picked
            .iter()
            .copied()
            .filter(|i| self.dropped.binary_search(i).is_err())
            .collect()
    }
}

impl Scenario {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let fraction = |x: f64| (0.0..=1.0).contains(&x);
        if !(self.participation > 0.0 && self.participation <= 1.0) {
            return Err((
                "scenario.participation",
                format!("must be in (0, 1], got {}", self.participation),
            ));
        }
        if !(fraction(self.dropout) && self.dropout < 1.0) {
            return Err((
                "scenario.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if !fraction(self.quorum) {
            return Err((
                "scenario.quorum",
                format!("must be a fraction in [0, 1], got {}", self.quorum),
            ));
        }
        if !fraction(self.byzantine) {
            return Err((
                "scenario.byzantine",
                format!("must be in [0, 1], got {}", self.byzantine),
            ));
        }
        if !(self.deadline.is_finite() && self.deadline > 0.0) {
            return Err((
                "scenario.deadline",
                format!("must be positive seconds, got {}", self.deadline),
            ));
        }
        if !(self.latency.is_finite() && self.latency >= 0.0) {
            return Err((
                "scenario.latency",
                format!("must be non-negative seconds, got {}", self.latency),
            ));
        }
        if !(self.bandwidth.is_finite() && self.bandwidth >= 0.0) {
            return Err((
                "scenario.bandwidth",
                format!("must be non-negative bytes/s, got {}", self.bandwidth),
            ));
        }
        self.delay.validate().map_err(|r| ("scenario.delay", r))?;
        Ok(())
    }

    /// The Byzantine members: round(fraction × nodes) of them, drawn once per run.
    pub fn byzantine_members(&self, nodes: usize, seed: u64) -> Vec<usize> {
        let count = (self.byzantine * nodes as f64).round() as usize;
        let mut all: Vec<usize> = (0..nodes).collect();
        all.shuffle(&mut stream(seed, "byzantine", 0, 0));
        let mut chosen = all[..count.min(nodes)].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// The draw of `round`: ⌈participation × nodes⌉ members (at least one), then
    /// independent dropouts and delays.
    pub fn draw(&self, nodes: usize, seed: u64, round: u64) -> RoundDraw {
        let count = ((self.participation * nodes as f64).ceil() as usize).clamp(1, nodes);
        let mut all: Vec<usize> = (0..nodes).collect();
        all.shuffle(&mut stream(seed, "participation", round, 0));
        let mut picked = all[..count].to_vec();
        picked.sort_unstable();
        let mut dropped = Vec::new();
        let mut delays = vec![0.0; nodes];
        for &i in &picked {
            let mut rng = stream(seed, "dropout", round, i as u64);
            if rng.random::<f64>() < self.dropout {
                dropped.push(i);
            }
            delays[i] = self
                .delay
                .sample(&mut stream(seed, "delay", round, i as u64));
        }
        RoundDraw {
            picked,
            dropped,
            delays,
        }
    }

    /// Simulated seconds for a share of `bytes` to cross one link.
    pub fn transfer_seconds(&self, bytes: u64) -> f64 {
        let wire = if self.bandwidth > 0.0 {
            bytes as f64 / self.bandwidth
        } else {
            0.0
        };
        self.latency + wire
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_deterministic_and_respect_fractions() {
        let s = Scenario {
            participation: 0.5,
            dropout: 0.2,
            delay: Delay::Exponential { mean: 2.0 },
            ..Scenario::default()
        };
        let a = s.draw(100, 7, 3);
        assert_eq!(a, s.draw(100, 7, 3));
        assert_ne!(a.picked, s.draw(100, 7, 4).picked);
        assert_eq!(a.picked.len(), 50);
        assert!(
            a.dropped.len() > 2 && a.dropped.len() < 25,
            "{}",
            a.dropped.len()
        );
        assert_eq!(a.active().len(), 50 - a.dropped.len());
        let picked_delays: Vec<f64> = a.picked.iter().map(|&i| a.delays[i]).collect();
        let mean = picked_delays.iter().sum::<f64>() / 50.0;
        assert!(mean > 1.0 && mean < 3.5, "{mean}");
        assert_eq!(
            Scenario::default().draw(5, 1, 1).active(),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn byzantine_members_are_the_requested_fraction() {
        let s = Scenario {
            byzantine: 0.3,
            ..Scenario::default()
        };
        let b = s.byzantine_members(10, 1);
        assert_eq!(b.len(), 3);
        assert_eq!(b, s.byzantine_members(10, 1));
    }

    #[test]
    fn attacks_change_what_they_should() {
        let honest: Vec<f32> = vec![3.0, 1.0, 0.0, 0.5, 2.0, -1.0];
        let mut rng = stream(1, "t", 0, 0);
        let mut x = honest.clone();
        Attack::LabelFlip.apply(&mut x, 3, &mut rng);
        assert_eq!(x, vec![0.0, 1.0, 3.0, -1.0, 2.0, 0.5]);
        let mut x = honest.clone();
        Attack::Scaled { factor: -2.0 }.apply(&mut x, 3, &mut rng);
        assert_eq!(x[0], -6.0);
        let mut x = honest.clone();
        Attack::ConstantClass { class: 1 }.apply(&mut x, 3, &mut rng);
        assert_eq!(x, vec![0.0, 20.0, 0.0, 0.0, 20.0, 0.0]);
        let mut x = honest.clone();
        Attack::Random.apply(&mut x, 3, &mut rng);
        assert_ne!(x, honest);
        assert!(x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn transfer_time_adds_latency_and_serialisation() {
        let s = Scenario {
            latency: 0.1,
            bandwidth: 1e6,
            ..Scenario::default()
        };
        assert!((s.transfer_seconds(500_000) - 0.6).abs() < 1e-12);
        assert_eq!(Scenario::default().transfer_seconds(1 << 30), 0.0);
    }

    #[test]
    fn bad_values_name_their_field() {
        let s = Scenario {
            delay: Delay::Uniform { min: 3.0, max: 1.0 },
            ..Scenario::default()
        };
        assert_eq!(s.validate().unwrap_err().0, "scenario.delay");
    }
}
