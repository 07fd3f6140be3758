//! Linux network namespaces for tests of members behind NATs.
//!
//! [`NatLab::create`] builds, with `ip` and `iptables` (root needed), one
//! NAT per entry of its argument:
//!
//! ```text
//!   <p>-pub   10.77.0.1/24 on bridge br0: the public side (coordinator, public members)
//!     |  10.77.0.11              |  10.77.0.12   …
//!   <p>-r1  router (NAT)         <p>-r2  router (NAT)
//!     |  10.77.1.1               |  10.77.2.1
//!   <p>-m1  10.77.1.2            <p>-m2  10.77.2.2   (members behind the NATs)
//! ```
//!
//! Each router forwards its member's outbound traffic with source NAT and
//! drops every inbound packet that does not belong to a connection (or UDP
//! flow) its member opened: a home or corporate NAT. A [`Nat::PortPreserving`]
//! router keeps the member's source port where it can (Linux MASQUERADE), so
//! the address a peer observes is the one hole punching needs; a
//! [`Nat::Symmetric`] one picks a random port per connection
//! (`--random-fully`), which defeats hole punching. The public side has
//! no route into 10.77.1.0/24 or 10.77.2.0/24, so the members' own
//! addresses are unreachable from anywhere but their own namespace.
//! Everything is removed when the [`NatLab`] is dropped. No packet leaves
//! the namespaces.

use std::process::Command;

/// How a router translates its member's outbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Source port kept where possible: hole punching works.
    PortPreserving,
    /// A random source port per connection: hole punching fails.
    Symmetric,
}

/// The namespaces of one test; removed on drop.
pub struct NatLab {
    prefix: String,
    created: Vec<String>,
}

/// Runs `ip`/`iptables` arguments; the error says which command failed and why.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NatLab {
    /// The public namespace (coordinator, public members).
    pub fn public(&self) -> String {
        format!("{}-pub", self.prefix)
    }

    /// The namespace of the member behind NAT `i` (from 1).
    pub fn behind_nat(&self, i: u8) -> String {
        format!("{}-m{i}", self.prefix)
    }

    /// Address of the public namespace, and of the member behind NAT `i`.
    pub const PUBLIC_IP: &'static str = "10.77.0.1";
    pub fn member_ip(i: u8) -> String {
        format!("10.77.{i}.2")
    }

    /// Builds the namespaces under a prefix unique to this process: member
    /// `i` (from 1) behind a router of kind `nats[i - 1]`.
    pub fn create(nats: &[Nat]) -> Result<NatLab, String> {
        let prefix = format!("fd{}", std::process::id() % 100_000);
        let mut lab = NatLab {
            prefix: prefix.clone(),
            created: Vec::new(),
        };
        let p = prefix.as_str();
        let public = lab.public();
        lab.add_namespace(&public)?;
        let ns = |n: &str| format!("{p}-{n}");
        run("ip", &["-n", &public, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &public, "addr", "add", "10.77.0.1/24", "dev", "br0"])?;
        run("ip", &["-n", &public, "link", "set", "br0", "up"])?;
        for (i, nat) in (1u8..).zip(nats) {
            let (router, member) = (ns(&format!("r{i}")), ns(&format!("m{i}")));
            lab.add_namespace(&router)?;
            lab.add_namespace(&member)?;
            // Router's public leg, on the bridge.
            let (rp, bp) = (format!("{p}-rp{i}"), format!("{p}-bp{i}"));
            run("ip", &["link", "add", &rp, "type", "veth", "peer", "name", &bp])?;
            run("ip", &["link", "set", &rp, "netns", &router])?;
            run("ip", &["link", "set", &bp, "netns", &public])?;
            run("ip", &["-n", &public, "link", "set", &bp, "master", "br0"])?;
            run("ip", &["-n", &public, "link", "set", &bp, "up"])?;
            let router_public = format!("10.77.0.1{i}/24");
            run("ip", &["-n", &router, "addr", "add", &router_public, "dev", &rp])?;
            run("ip", &["-n", &router, "link", "set", &rp, "up"])?;
            // The member's leg.
            let (ri, mo) = (format!("{p}-ri{i}"), format!("{p}-mo{i}"));
            run("ip", &["link", "add", &ri, "type", "veth", "peer", "name", &mo])?;
            run("ip", &["link", "set", &ri, "netns", &router])?;
            run("ip", &["link", "set", &mo, "netns", &member])?;
            let inside = format!("10.77.{i}.1/24");
            run("ip", &["-n", &router, "addr", "add", &inside, "dev", &ri])?;
            run("ip", &["-n", &router, "link", "set", &ri, "up"])?;
            let member_addr = format!("{}/24", NatLab::member_ip(i));
            run("ip", &["-n", &member, "addr", "add", &member_addr, "dev", &mo])?;
            run("ip", &["-n", &member, "link", "set", &mo, "up"])?;
            let gateway = format!("10.77.{i}.1");
            run("ip", &["-n", &member, "route", "add", "default", "via", &gateway])?;
            // The NAT: forward out with source NAT; in, only replies.
            let exec = |args: &[&str]| {
                let mut all = vec!["netns", "exec", router.as_str()];
                all.extend_from_slice(args);
                run("ip", &all)
            };
            exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let mut masquerade =
                vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", &rp, "-j", "MASQUERADE"];
            if *nat == Nat::Symmetric {
                masquerade.push("--random-fully");
            }
            exec(&masquerade)?;
            for chain in ["FORWARD", "INPUT"] {
                exec(&[
                    "iptables", "-A", chain, "-i", &rp, "-m", "conntrack", "--ctstate",
                    "ESTABLISHED,RELATED", "-j", "ACCEPT",
                ])?;
                exec(&["iptables", "-A", chain, "-i", &rp, "-j", "DROP"])?;
            }
        }
        Ok(lab)
    }

    fn add_namespace(&mut self, name: &str) -> Result<(), String> {
        run("ip", &["netns", "add", name])?;
        self.created.push(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"])
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        // Deleting a namespace removes its interfaces (and the veth peers).
        for name in self.created.iter().rev() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
