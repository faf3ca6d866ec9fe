//! In-pod traffic redirection, programmed over netlink with no `iptables` or `nft` binary: a node
//! may lack both, and the agent must not depend on what the distribution ships.
//!
//! Inside a pod's network namespace this installs one nftables table, `inet ambit`, with the
//! semantics of Istio's in-pod rules (see `docs/reference/redirection.md`):
//! - outbound TCP from the application (not to loopback, not marked by ztunnel) is redirected to
//!   ztunnel's outbound listener (15001); ztunnel reads the original destination with
//!   `SO_ORIGINAL_DST`;
//! - inbound TCP to the pod (except HBONE on 15008) is redirected to 15006, keeping the client's
//!   source address;
//! - ztunnel's own sockets carry the mark `0x539/0xfff` and are never redirected;
//! - connections ztunnel opens to the application from the client's address get the connection
//!   mark `0x111`, restored onto the application's replies, which policy routing (`fwmark 0x111
//!   lookup 100`, `local default dev lo table 100`) returns to ztunnel's socket;
//! - kubelet probes, SNATed by the node to 169.254.7.127, go straight to the application.
//!
//! Removal deletes the table and the routing entries and touches nothing else.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::SockProtocol;
use thiserror::Error;

pub mod host;
mod netlink;
mod nft;
mod route;

use netlink::{NLM_F_ACK, NLM_F_REQUEST, Netlink};

/// Ports, marks and addresses of the rule set. The defaults match upstream Istio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// ztunnel's outbound capture port.
    pub outbound_port: u16,
    /// ztunnel's inbound plaintext capture port.
    pub inbound_port: u16,
    /// ztunnel's HBONE port (never redirected).
    pub hbone_port: u16,
    /// The mark on ztunnel's sockets.
    pub ztunnel_mark: u32,
    /// The connection mark for ztunnel's spoofed connections to the application.
    pub connection_mark: u32,
    /// The bits of the packet mark the rules own.
    pub mark_mask: u32,
    /// Source address of kubelet probes (SNATed on the node).
    pub probe_v4: Ipv4Addr,
    /// The IPv6 probe source.
    pub probe_v6: Ipv6Addr,
    /// Routing table that delivers marked replies locally.
    pub route_table: u32,
    /// Priority of the fwmark rule.
    pub rule_priority: u32,
    /// Also install the IPv6 rules.
    pub ipv6: bool,
    /// Redirect inbound traffic to 15006 (off: "ingress mode", inbound goes straight to the app).
    pub capture_inbound: bool,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            hbone_port: 15008,
            ztunnel_mark: 0x539,
            connection_mark: 0x111,
            mark_mask: 0xfff,
            probe_v4: Ipv4Addr::new(169, 254, 7, 127),
            probe_v6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
                .parse()
                .expect("a literal IPv6 address"),
            route_table: 100,
            rule_priority: 32764,
            ipv6: false,
            capture_inbound: true,
        }
    }
}

/// A failure programming one pod's namespace.
#[derive(Debug, Error)]
#[error("in-pod redirection in {netns}: {step}: {source}")]
pub struct RedirectError {
    /// Which namespace (as the caller named it).
    pub netns: String,
    /// What was being done.
    pub step: String,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

/// Runs `f` on a short-lived thread inside `netns`, so no other work ever runs in the pod's
/// namespace by accident.
pub fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    name: &str,
    f: impl FnOnce() -> Result<T, (String, io::Error)> + Send,
) -> Result<T, RedirectError> {
    let wrap = |(step, source): (String, io::Error)| RedirectError {
        netns: name.to_string(),
        step,
        source,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    (
                        "entering the network namespace (needs CAP_SYS_ADMIN)".to_string(),
                        io::Error::from(e),
                    )
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err((
                    "redirection thread panicked".to_string(),
                    io::Error::other("panic"),
                ))
            })
    })
    .map_err(wrap)
}

fn open(protocol: SockProtocol, what: &str) -> Result<Netlink, (String, io::Error)> {
    Netlink::open(protocol).map_err(|e| (format!("opening a {what} netlink socket"), e))
}

/// Installs (or replaces, atomically) the rule set in `netns`. Idempotent.
pub fn install(
    netns: BorrowedFd<'_>,
    name: &str,
    config: &RedirectConfig,
) -> Result<(), RedirectError> {
    let chains = nft::ruleset(config);
    in_netns(netns, name, || {
        let mut nl = open(SockProtocol::NetlinkNetFilter, "netfilter")?;
        let (messages, acks) = nft::install_batch(&chains, || nl.next_seq());
        nl.transact(&messages, acks)
            .map_err(|(index, e)| (describe_failure(&chains, index), e))?;
        let mut rt = open(SockProtocol::NetlinkRoute, "route")?;
        route::install(&mut rt, config)
    })
}

/// Which part of the batch message `index` was, for error messages.
fn describe_failure(chains: &[nft::Chain], index: usize) -> String {
    // 0 batch begin, 1..=3 table replace, then chains, then rules in order.
    let chain_start = 4;
    if index < chain_start {
        return format!("creating table inet {}", nft::TABLE);
    }
    if index < chain_start + chains.len() {
        let chain = &chains[index - chain_start];
        return format!(
            "creating chain {} (kernel without nf_tables nat/route support?)",
            chain.name
        );
    }
    let mut at = chain_start + chains.len();
    for chain in chains {
        for rule in &chain.rules {
            if at == index {
                return format!("adding rule `{}` to chain {}", rule.text, chain.name);
            }
            at += 1;
        }
    }
    "committing the nftables batch".to_string()
}

/// Removes everything [`install`] added. Returns whether the table was there. Idempotent.
pub fn remove(
    netns: BorrowedFd<'_>,
    name: &str,
    config: &RedirectConfig,
) -> Result<bool, RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open(SockProtocol::NetlinkNetFilter, "netfilter")?;
        let present = table_present(&mut nl)?;
        if present {
            let messages = nft::remove_batch(|| nl.next_seq());
            nl.transact(&messages, 1)
                .map_err(|(_, e)| (format!("deleting table inet {}", nft::TABLE), e))?;
        }
        let mut rt = open(SockProtocol::NetlinkRoute, "route")?;
        route::remove(&mut rt, config)?;
        Ok(present)
    })
}

fn table_present(nl: &mut Netlink) -> Result<bool, (String, io::Error)> {
    let seq = nl.next_seq();
    let request = nft::table_message(nft::NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, seq);
    match nl.request(request) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => Ok(false),
        Err(e) => Err((format!("looking up table inet {}", nft::TABLE), e)),
    }
}

/// Whether the rule set is installed in `netns`.
pub fn is_installed(netns: BorrowedFd<'_>, name: &str) -> Result<bool, RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open(SockProtocol::NetlinkNetFilter, "netfilter")?;
        table_present(&mut nl)
    })
}

/// The rule set for `config` in `nft` syntax (what [`install`] programs).
pub fn ruleset_text(config: &RedirectConfig) -> String {
    nft::text(&nft::ruleset(config))
}

/// What is installed in `netns`: the rule set text with the live rule count per chain, or a note
/// that nothing is installed.
pub fn describe(
    netns: BorrowedFd<'_>,
    name: &str,
    config: &RedirectConfig,
) -> Result<String, RedirectError> {
    let chains = nft::ruleset(config);
    let counts = in_netns(netns, name, || {
        let mut nl = open(SockProtocol::NetlinkNetFilter, "netfilter")?;
        if !table_present(&mut nl)? {
            return Ok(None);
        }
        let seq = nl.next_seq();
        let replies = nl
            .request(nft::rule_dump(seq))
            .map_err(|e| ("listing rules".to_string(), e))?;
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for reply in replies {
            // nfgenmsg (4 bytes), then attributes.
            for (kind, value) in netlink::attributes(reply.payload.get(4..).unwrap_or_default()) {
                if kind == nft::NFTA_RULE_CHAIN {
                    let chain = String::from_utf8_lossy(value)
                        .trim_end_matches('\0')
                        .to_string();
                    *counts.entry(chain).or_default() += 1;
                }
            }
        }
        Ok(Some(counts))
    })?;
    Ok(match counts {
        None => format!("no in-pod redirection installed in {name}\n"),
        Some(counts) => {
            let mut text = nft::text(&chains);
            text.push_str("# live rules per chain:");
            for chain in &chains {
                text.push_str(&format!(
                    " {}={}",
                    chain.name,
                    counts.get(chain.name).copied().unwrap_or(0)
                ));
            }
            text.push('\n');
            text
        }
    })
}
