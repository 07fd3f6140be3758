//! What the coordinator remembers across a restart, and the round state
//! machine over it.
//!
//! A coordinator that crashes or is restarted mid-federation must not make
//! members start over: [`CoordinatorState`] holds the members (with their
//! addresses), the open round's announcement, the last closed round and the
//! metrics received per round. The coordinator saves it (JSON, atomically)
//! after every change and, on start, resumes from it when it belongs to the
//! same federation.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use fd_data::fsutil::write_atomic;
use fd_protocol::{FederationManifest, Member, PublicKey, RoundAnnouncement, RoundMetrics};
use serde::{Deserialize, Serialize};

/// The state file's format version; a different one is refused, not guessed at.
pub const STATE_VERSION: u32 = 1;

/// Errors loading or saving the state file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read coordinator state {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write coordinator state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("coordinator state {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "coordinator state {path} belongs to federation `{found}`, not `{expected}`; move it away or set `state_file` to another path"
    )]
    OtherFederation {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "coordinator state {path} was written for a different manifest of federation `{federation}` (rounds, public set or subsets changed); move it away to start over"
    )]
    OtherManifest { path: PathBuf, federation: String },
}

/// Where the federation stands; saved as JSON after every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorState {
    pub version: u32,
    /// The federation this state belongs to; checked on resume.
    pub manifest: FederationManifest,
    /// Joined members in join order; a re-join replaces the entry in place.
    pub members: Vec<Member>,
    /// The open round as announced (its deadline and member list); None between rounds.
    pub open: Option<RoundAnnouncement>,
    /// The last closed round; 0 before round 1 closes.
    pub last_closed: u64,
    /// Metrics received, by round, one per member, in member-key order.
    pub metrics: BTreeMap<u64, Vec<RoundMetrics>>,
}

/// What the round clock does next.
#[derive(Debug, Clone, PartialEq)]
pub enum NextRound {
    /// Announce this round (newly opened, or still open from before a restart).
    Announce(RoundAnnouncement),
    /// Every round is closed.
    Finished,
}

/// What [`CoordinatorState::record_metrics`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The member's first report of the open round: recorded.
    New,
    /// The report already recorded, again (a retry): nothing changed.
    Repeat,
    /// The member already reported this round with other values: the first
    /// report stands.
    Conflict,
    /// Not a member, another federation, or not the open round: ignored.
    Ignored,
}

impl CoordinatorState {
    /// A federation before anyone joined.
    pub fn new(manifest: FederationManifest) -> Self {
        CoordinatorState {
            version: STATE_VERSION,
            manifest,
            members: Vec::new(),
            open: None,
            last_closed: 0,
            metrics: BTreeMap::new(),
        }
    }

    /// The state saved at `path` if there is one, refused unless it belongs to `manifest`.
    pub fn load(path: &Path, manifest: &FederationManifest) -> Result<Option<Self>, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let parse = |message: String| StateError::Parse {
            path: path.to_owned(),
            message,
        };
        let state: CoordinatorState =
            serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(parse(format!(
                "format version {} (this coordinator reads {STATE_VERSION})",
                state.version
            )));
        }
        if state.manifest.federation_id != manifest.federation_id {
            return Err(StateError::OtherFederation {
                path: path.to_owned(),
                found: state.manifest.federation_id,
                expected: manifest.federation_id.clone(),
            });
        }
        if state.manifest != *manifest {
            return Err(StateError::OtherManifest {
                path: path.to_owned(),
                federation: manifest.federation_id.clone(),
            });
        }
        if state.last_closed > manifest.rounds
            || state
                .open
                .as_ref()
                .is_some_and(|a| a.round != state.last_closed + 1)
        {
            return Err(parse(format!(
                "round {} open after round {} closed, of {}",
                state.open.as_ref().map_or(0, |a| a.round),
                state.last_closed,
                manifest.rounds
            )));
        }
        Ok(Some(state))
    }

    /// Replaces the file at `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(self).expect("the state serialises to JSON");
        write_atomic(path, &json, 0o644).map_err(|source| StateError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// Adds a member, or replaces the one with the same key (e.g. a restarted
    /// node listening on a new address). An open round's announcement gets
    /// the member too, so the round waits for its metrics.
    pub fn join(&mut self, member: Member) {
        upsert(&mut self.members, member.clone());
        if let Some(open) = &mut self.open {
            upsert(&mut open.members, member);
        }
    }

    pub fn is_member(&self, key: &PublicKey) -> bool {
        self.members.iter().any(|m| m.key == *key)
    }

    /// Records a member's metrics for the open round, once: a member's row of
    /// a round is its first report (a retry of the same report changes
    /// nothing and costs no write; a different one is refused), so it can
    /// neither rewrite its row nor make the coordinator rewrite its state
    /// file on every request.
    pub fn record_metrics(&mut self, m: RoundMetrics) -> Recorded {
        let open = self.open.as_ref().map(|a| a.round);
        if m.federation_id != self.manifest.federation_id
            || Some(m.round) != open
            || !self.is_member(&m.node)
        {
            return Recorded::Ignored;
        }
        // The name the member joined with (checked then), whatever the report says.
        let mut m = m;
        if let Some(member) = self.members.iter().find(|x| x.key == m.node) {
            m.name = member.name.clone();
        }
        let reports = self.metrics.entry(m.round).or_default();
        match reports.iter().find(|x| x.node == m.node) {
            Some(x) if *x == m => Recorded::Repeat,
            Some(_) => Recorded::Conflict,
            None => {
                reports.push(m);
                // Key order, as the CSV and `RoundClosed` have always listed them.
                reports.sort_by_key(|r| r.node);
                Recorded::New
            }
        }
    }

    /// Opens the next round, or refreshes the deadline and member list of the
    /// round left open (by a restart); `deadline_unix_ms` is the new deadline.
    pub fn next_round(&mut self, deadline_unix_ms: u64) -> NextRound {
        if self.open.is_none() {
            if self.last_closed >= self.manifest.rounds {
                return NextRound::Finished;
            }
            self.open = Some(RoundAnnouncement {
                federation_id: self.manifest.federation_id.clone(),
                round: self.last_closed + 1,
                deadline_unix_ms,
                members: Vec::new(),
            });
        }
        let open = self.open.as_mut().expect("a round is open");
        open.deadline_unix_ms = deadline_unix_ms;
        open.members = self.members.clone();
        NextRound::Announce(open.clone())
    }

    /// Whether every member of the open round has reported; (reported, expected).
    pub fn reports(&self) -> (usize, usize) {
        let Some(open) = &self.open else {
            return (0, 0);
        };
        let reports = self.metrics.get(&open.round).map_or(&[][..], |v| v);
        let reported = open
            .members
            .iter()
            .filter(|m| reports.iter().any(|r| r.node == m.key))
            .count();
        (reported, open.members.len())
    }

    /// Closes the open round; returns its number and metrics (None if none was open).
    pub fn close_round(&mut self) -> Option<(u64, Vec<RoundMetrics>)> {
        let open = self.open.take()?;
        self.last_closed = open.round;
        Some((
            open.round,
            self.metrics.get(&open.round).cloned().unwrap_or_default(),
        ))
    }

    /// The metrics of every closed round, in round order.
    pub fn closed_metrics(&self) -> BTreeMap<u64, Vec<RoundMetrics>> {
        (1..=self.last_closed)
            .map(|r| (r, self.metrics.get(&r).cloned().unwrap_or_default()))
            .collect()
    }
}

fn upsert(members: &mut Vec<Member>, member: Member) {
    match members.iter_mut().find(|m| m.key == member.key) {
        Some(m) => *m = member,
        None => members.push(member),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::{Digest, PublicSetDescriptor, SigningKey};

    fn manifest(id: &str, rounds: u64) -> FederationManifest {
        FederationManifest {
            federation_id: id.into(),
            public_set: PublicSetDescriptor {
                source: "test".into(),
                samples: 10,
                digest: Digest([3; 32]),
            },
            classes: 10,
            rounds,
            subset_size: 5,
            seed: 1,
        }
    }

    fn member(seed: u8, addr: &str) -> Member {
        Member {
            key: SigningKey::from_seed([seed; 32]).public_key(),
            name: format!("m{seed}"),
            addrs: vec![addr.into()],
        }
    }

    fn metrics(id: &str, round: u64, node: &Member, accuracy: f64) -> RoundMetrics {
        RoundMetrics {
            test_accuracy: accuracy,
            rejections: vec![("late".into(), 1)],
            distilled: true,
            ..RoundMetrics::new(id, round, node.key, &node.name)
        }
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let m = manifest("f", 3);
        assert!(CoordinatorState::load(&path, &m).unwrap().is_none());

        let mut state = CoordinatorState::new(m.clone());
        let (a, b) = (
            member(1, "/ip4/127.0.0.1/tcp/1"),
            member(2, "/ip4/127.0.0.1/tcp/2"),
        );
        state.join(a.clone());
        state.join(b.clone());
        assert!(matches!(state.next_round(1000), NextRound::Announce(x) if x.round == 1));
        assert_eq!(state.record_metrics(metrics("f", 1, &a, 0.5)), Recorded::New);
        assert_eq!(state.record_metrics(metrics("f", 1, &b, 0.7)), Recorded::New);
        assert_eq!(state.close_round().unwrap().1.len(), 2);
        state.next_round(2000);
        assert_eq!(state.record_metrics(metrics("f", 2, &a, 0.6)), Recorded::New);
        state.save(&path).unwrap();

        let loaded = CoordinatorState::load(&path, &m).unwrap().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.open.as_ref().unwrap().round, 2);
        assert_eq!(loaded.open.as_ref().unwrap().deadline_unix_ms, 2000);
        assert_eq!(loaded.last_closed, 1);
        assert_eq!(loaded.members[1].addrs, b.addrs);
        assert_eq!(loaded.metrics[&2].len(), 1);
        assert_eq!(loaded.reports(), (1, 2));
        // Only the temporary file's rename leaves a trace.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rounds_open_close_and_resume_in_order() {
        let mut state = CoordinatorState::new(manifest("f", 2));
        let a = member(1, "/ip4/127.0.0.1/tcp/1");
        state.join(a.clone());
        // No round open: metrics are not recorded.
        assert_eq!(state.record_metrics(metrics("f", 1, &a, 0.5)), Recorded::Ignored);
        let NextRound::Announce(first) = state.next_round(10) else {
            panic!("round 1 opens")
        };
        assert_eq!((first.round, first.members.len()), (1, 1));
        // Refreshing an open round keeps its number and takes the new deadline.
        let NextRound::Announce(again) = state.next_round(20) else {
            panic!("round 1 stays open")
        };
        assert_eq!((again.round, again.deadline_unix_ms), (1, 20));
        // A member joining mid-round is expected to report too.
        let b = member(2, "/ip4/127.0.0.1/tcp/2");
        state.join(b.clone());
        assert_eq!(state.reports(), (0, 2));
        // A re-join with a new address replaces the entry.
        let moved = member(2, "/ip4/127.0.0.1/tcp/9");
        state.join(moved.clone());
        assert_eq!(state.members, vec![a.clone(), moved.clone()]);
        assert_eq!(state.open.as_ref().unwrap().members, vec![a.clone(), moved]);
        // Foreign federation, wrong round, non-member: refused.
        assert_eq!(state.record_metrics(metrics("g", 1, &a, 0.5)), Recorded::Ignored);
        assert_eq!(state.record_metrics(metrics("f", 2, &a, 0.5)), Recorded::Ignored);
        assert_eq!(
            state.record_metrics(metrics("f", 1, &member(3, "x"), 0.5)),
            Recorded::Ignored
        );
        assert_eq!(state.record_metrics(metrics("f", 1, &a, 0.5)), Recorded::New);
        // A retry is a repeat; a changed report does not replace the first.
        assert_eq!(state.record_metrics(metrics("f", 1, &a, 0.5)), Recorded::Repeat);
        assert_eq!(state.record_metrics(metrics("f", 1, &a, 0.6)), Recorded::Conflict);
        assert_eq!(state.record_metrics(metrics("f", 1, &b, 0.6)), Recorded::New);
        assert_eq!(state.reports(), (2, 2));
        let (round, m) = state.close_round().unwrap();
        let a_row = m.iter().find(|r| r.node == a.key).unwrap();
        assert_eq!((round, m.len(), a_row.test_accuracy), (1, 2, 0.5));
        assert!(matches!(state.next_round(30), NextRound::Announce(x) if x.round == 2));
        state.close_round();
        assert_eq!(state.next_round(40), NextRound::Finished);
        assert_eq!(
            state.closed_metrics().keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn a_state_file_of_another_federation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        CoordinatorState::new(manifest("other", 3))
            .save(&path)
            .unwrap();
        let err = CoordinatorState::load(&path, &manifest("mine", 3)).unwrap_err();
        assert!(matches!(err, StateError::OtherFederation { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(err.to_string().contains("`other`"));
        // Same id, different manifest (more rounds): refused as well.
        let err = CoordinatorState::load(&path, &manifest("other", 4)).unwrap_err();
        assert!(matches!(err, StateError::OtherManifest { .. }), "{err}");
        std::fs::write(&path, "{ not json").unwrap();
        let err = CoordinatorState::load(&path, &manifest("mine", 3)).unwrap_err();
        assert!(matches!(err, StateError::Parse { .. }), "{err}");
    }
}
