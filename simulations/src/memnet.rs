//! The in-memory network: shares handed from one member's round engine to
//! another's inbox within the process, on a simulated clock.
//!
//! It implements the same [`ShareTransport`] the libp2p runtime does, so
//! every share still passes the receiver's full validation gate
//! ([`SharedInbox::offer`]: member, round, signature, subset, shape, finite
//! values) and is counted in bytes exactly as on the wire (frame plus length
//! prefix). What it replaces is time: a share leaves its sender after the
//! sender's straggler delay, its uplink sends one share after another at
//! `bandwidth`, each arrives `latency` later, and a receiver ignores shares
//! that arrive after the round's `deadline`. Because arrival is computed,
//! not measured, a run replays exactly.
//!
//! A round closes for everyone once every active member has pushed its
//! shares (a barrier): nothing else can arrive in time after that.
//!
//! A delivery hook ([`MemoryNetwork::on_delivery`]) sees every share a
//! receiver accepted; the leakage audit ([`crate::audit`]) is one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::bail;
use fd_net::{Traffic, share_frame_len};
use fd_node::round::{RoundPlan, ShareTransport, SharedInbox};
use fd_protocol::{LogitShare, Member, PublicKey};
use tokio::sync::Notify;

use crate::scenario::Scenario;

struct RoundState {
    round: u64,
    /// Members that push shares this round.
    senders: usize,
    finished: usize,
    /// Per member: seconds before its shares leave.
    delays: Vec<f64>,
    traffic: Vec<Traffic>,
    /// Per receiver: shares that arrived after the deadline.
    late: Vec<u64>,
    /// Per receiver: simulated arrival times of the shares it accepted.
    arrivals: Vec<Vec<f64>>,
}

/// One round's outcome on the simulated clock.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTiming {
    pub late: Vec<u64>,
    pub arrivals: Vec<Vec<f64>>,
}

/// Called with (sender, receiver, share) for every share a receiver's inbox
/// accepted, on the pushing member's task.
pub type DeliveryHook = Box<dyn Fn(usize, usize, &LogitShare) + Send + Sync>;

pub struct MemoryNetwork {
    inboxes: Vec<Arc<SharedInbox>>,
    delivered: OnceLock<DeliveryHook>,
    index_of: HashMap<PublicKey, usize>,
    scenario: Scenario,
    state: Mutex<RoundState>,
    finished: Notify,
}

impl MemoryNetwork {
    /// A network between `members` (by index), each with its inbox.
    pub fn new(
        members: &[Member],
        inboxes: Vec<Arc<SharedInbox>>,
        scenario: Scenario,
    ) -> Arc<Self> {
        let n = members.len();
        Arc::new(MemoryNetwork {
            inboxes,
            delivered: OnceLock::new(),
            index_of: members
                .iter()
                .enumerate()
                .map(|(i, m)| (m.key, i))
                .collect(),
            scenario,
            state: Mutex::new(RoundState {
                round: 0,
                senders: 0,
                finished: 0,
                delays: vec![0.0; n],
                traffic: vec![Traffic::default(); n],
                late: vec![0; n],
                arrivals: vec![Vec::new(); n],
            }),
            finished: Notify::new(),
        })
    }

    /// Opens `round`: `senders` members will push, with these straggler delays.
    pub fn start_round(&self, round: u64, senders: usize, delays: Vec<f64>) {
        let mut s = self.state.lock().unwrap();
        let n = s.traffic.len();
        *s = RoundState {
            round,
            senders,
            finished: 0,
            delays,
            traffic: vec![Traffic::default(); n],
            late: vec![0; n],
            arrivals: vec![Vec::new(); n],
        };
    }

    /// Late shares and arrival times of the round just run.
    pub fn timing(&self) -> RoundTiming {
        let s = self.state.lock().unwrap();
        RoundTiming {
            late: s.late.clone(),
            arrivals: s.arrivals.clone(),
        }
    }

    /// Sets the hook that sees every accepted share; one per network, set
    /// before the first round.
    pub fn on_delivery(&self, hook: DeliveryHook) {
        if self.delivered.set(hook).is_err() {
            panic!("a memory network has one delivery hook");
        }
    }

    /// Member `index`'s view of the network.
    pub fn endpoint(self: &Arc<Self>, index: usize) -> MemoryEndpoint {
        MemoryEndpoint {
            network: self.clone(),
            index,
        }
    }
}

pub struct MemoryEndpoint {
    network: Arc<MemoryNetwork>,
    index: usize,
}

impl ShareTransport for MemoryEndpoint {
    fn begin_round(&self, _plan: &RoundPlan) {}

    async fn push(
        &self,
        plan: &RoundPlan,
        peer: &Member,
        share: &LogitShare,
    ) -> anyhow::Result<()> {
        let net = &self.network;
        let Some(&to) = net.index_of.get(&peer.key) else {
            bail!("{} is not on this network", peer.name);
        };
        let bytes = share_frame_len(share)?;
        // The sender's uplink sends its shares one after another, in target order.
        let position = plan
            .targets
            .iter()
            .position(|t| t.key == peer.key)
            .unwrap_or(0) as u64;
        let on_time = {
            let mut s = net.state.lock().unwrap();
            if s.round != plan.round {
                bail!(
                    "round {} is not open on the network (open: {})",
                    plan.round,
                    s.round
                );
            }
            let leaves = s.delays[self.index];
            // latency + (position + 1) shares serialised on the uplink.
            let arrival = leaves + net.scenario.transfer_seconds(bytes * (position + 1));
            s.traffic[self.index].share_bytes_sent += bytes;
            s.traffic[self.index].shares_sent += 1;
            s.traffic[to].share_bytes_received += bytes;
            if arrival > net.scenario.deadline {
                s.late[to] += 1;
                None
            } else {
                Some(arrival)
            }
        };
        let Some(arrival) = on_time else {
            return Ok(());
        };
        match net.inboxes[to].offer(share) {
            Ok(()) => {
                net.state.lock().unwrap().arrivals[to].push(arrival);
                if let Some(hook) = net.delivered.get() {
                    hook(self.index, to, share);
                }
                Ok(())
            }
            Err(e) => bail!(
                "{} rejected the share ({}): {e}",
                peer.name,
                e.reason().as_str()
            ),
        }
    }

    async fn wait_for_shares(&self, plan: &RoundPlan, _inbox: &SharedInbox) {
        let net = &self.network;
        {
            let mut s = net.state.lock().unwrap();
            if s.round == plan.round {
                s.finished += 1;
            }
        }
        net.finished.notify_waiters();
        loop {
            let notified = net.finished.notified();
            {
                let s = net.state.lock().unwrap();
                if s.round != plan.round || s.finished >= s.senders {
                    return;
                }
            }
            notified.await;
        }
    }

    fn round_traffic(&self, round: u64) -> Traffic {
        let s = self.network.state.lock().unwrap();
        if s.round == round {
            s.traffic[self.index]
        } else {
            Traffic::default()
        }
    }
}
