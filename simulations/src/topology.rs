//! Who hears whom in a federated-distillation run.
//!
//! A topology gives each member the set of members whose shares it
//! receives (its in-neighbours); a member pushes its share to every member
//! that listens to it. `full` is the mesh every deployment uses; `random`
//! (each member hears k others, drawn once per run from the seed) and
//! `ring` (each hears its two neighbours) make distillation decentralised
//! over a sparse graph, where knowledge travels one hop per round.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::scenario::stream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Topology {
    #[default]
    Full,
    Random {
        k: usize,
    },
    Ring,
}

impl Topology {
    pub fn validate(&self, nodes: usize) -> Result<(), String> {
        match *self {
            Topology::Random { k } if k == 0 || k >= nodes => Err(format!(
                "random: k must be between 1 and nodes − 1 ({}), got {k}",
                nodes.saturating_sub(1)
            )),
            _ => Ok(()),
        }
    }

    /// For each member, the members it hears, ascending (never itself).
    pub fn in_neighbours(&self, nodes: usize, seed: u64) -> Vec<Vec<usize>> {
        (0..nodes)
            .map(|i| {
                let mut hears: Vec<usize> = match *self {
                    Topology::Full => (0..nodes).filter(|&j| j != i).collect(),
                    Topology::Ring => {
                        let mut n = vec![(i + nodes - 1) % nodes, (i + 1) % nodes];
                        n.retain(|&j| j != i);
                        n.dedup();
                        n
                    }
                    Topology::Random { k } => {
                        let mut others: Vec<usize> = (0..nodes).filter(|&j| j != i).collect();
                        others.shuffle(&mut stream(seed, "topology", 0, i as u64));
                        others.truncate(k);
                        others
                    }
                };
                hears.sort_unstable();
                hears.dedup();
                hears
            })
            .collect()
    }
}

/// Inverts in-neighbour lists: for each member, who listens to it, ascending.
pub fn out_neighbours(in_neighbours: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); in_neighbours.len()];
    for (receiver, senders) in in_neighbours.iter().enumerate() {
        for &s in senders {
            out[s].push(receiver);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let full = Topology::Full.in_neighbours(4, 0);
        assert_eq!(full[2], vec![0, 1, 3]);
        let ring = Topology::Ring.in_neighbours(5, 0);
        assert_eq!(ring[0], vec![1, 4]);
        assert_eq!(Topology::Ring.in_neighbours(2, 0)[0], vec![1]);
        let random = Topology::Random { k: 3 }.in_neighbours(10, 9);
        assert!(
            random
                .iter()
                .enumerate()
                .all(|(i, h)| h.len() == 3 && !h.contains(&i))
        );
        assert_eq!(random, Topology::Random { k: 3 }.in_neighbours(10, 9));
        let out = out_neighbours(&ring);
        assert_eq!(out[0], vec![1, 4]);
        assert_eq!(out_neighbours(&full)[1], vec![0, 2, 3]);
        assert!(Topology::Random { k: 4 }.validate(4).is_err());
    }
}
