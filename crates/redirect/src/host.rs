//! The node-side half of probe handling: kubelet health probes are TCP connections the node
//! itself opens to a pod's IP. Inside a captured pod they would be redirected to ztunnel like any
//! inbound connection; instead the node rewrites their source to the probe address
//! (169.254.7.127, or the IPv6 one), which the in-pod rules let straight through to the
//! application.
//!
//! In the node's network namespace this keeps one table of our own, `inet ambit-host`:
//! - two sets, `pods-v4` and `pods-v6`, holding the IPs of captured pods;
//! - one `postrouting` NAT chain with, per family, the rule "TCP, sent by a local socket, to an
//!   address in the set: `snat` to the probe address".
//!
//! Only packets with a local socket match, so traffic the node merely forwards (pod to pod,
//! ztunnel's HBONE) keeps its source. Every change is one nf_tables batch, so it applies whole or
//! not at all. [`install`] keeps the set's contents (an agent restart never drops a captured
//! pod's entry, so probes keep working while the agent is down), and removing the table is left
//! to [`remove_if_empty`].

use std::io;
use std::net::IpAddr;
use std::os::fd::BorrowedFd;

use nix::sys::socket::SockProtocol;

use crate::netlink::{self, Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, Netlink};
use crate::nft::{self, Family, RuleBuilder};
use crate::{RedirectConfig, RedirectError, in_netns};

/// The node-side table.
pub const TABLE: &str = "ambit-host";
/// The set of captured pods' IPv4 addresses.
pub const SET_V4: &str = "pods-v4";
/// The set of captured pods' IPv6 addresses.
pub const SET_V6: &str = "pods-v6";
/// The NAT chain.
pub const CHAIN: &str = "postrouting";

const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_DELRULE: u16 = 8;
const NF_INET_POST_ROUTING: u32 = 4;
const NAT_SOURCE_PRIORITY: i32 = 100;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
/// nft's data type numbers for `ipv4_addr` and `ipv6_addr` (so `nft list` prints addresses).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const SET_ID_V4: u32 = 1;
const SET_ID_V6: u32 = 2;

/// What [`remove_if_empty`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRemoval {
    /// There was no table.
    Absent,
    /// The table was empty and is gone.
    Removed,
    /// The table still lists captured pods (their probes need it), so it stays.
    Kept(Vec<IpAddr>),
}

fn chain_rules(config: &RedirectConfig) -> Vec<nft::Rule> {
    vec![
        RuleBuilder::new()
            .daddr_in(Family::V4, SET_V4, SET_ID_V4)
            .tcp()
            .local_socket()
            .snat(Family::V4, IpAddr::V4(config.probe_v4)),
        RuleBuilder::new()
            .daddr_in(Family::V6, SET_V6, SET_ID_V6)
            .tcp()
            .local_socket()
            .snat(Family::V6, IpAddr::V6(config.probe_v6)),
    ]
}

/// The node-side table in `nft` syntax (what [`install`] programs; set contents aside).
pub fn ruleset_text(config: &RedirectConfig) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    for (set, kind) in [(SET_V4, "ipv4_addr"), (SET_V6, "ipv6_addr")] {
        out.push_str(&format!("\tset {set} {{\n\t\ttype {kind}\n\t}}\n"));
    }
    out.push_str(&format!(
        "\tchain {CHAIN} {{\n\t\ttype nat hook postrouting priority {NAT_SOURCE_PRIORITY}; policy accept;\n"
    ));
    for rule in chain_rules(config) {
        out.push_str(&format!("\t\t{}\n", rule.text));
    }
    out.push_str("\t}\n}\n");
    out
}

fn batch_edge(kind: u16, seq: u32) -> Vec<u8> {
    Message::new(
        kind,
        NLM_F_REQUEST,
        seq,
        &nft::nfgen(0, nft::NFNL_SUBSYS_NFTABLES),
    )
    .finish()
}

fn message(kind: u16, flags: u16, seq: u32) -> Message {
    Message::new(
        nft::nft_type(kind),
        flags,
        seq,
        &nft::nfgen(nft::NFPROTO_INET, 0),
    )
}

fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn set_of(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { SET_V4 } else { SET_V6 }
}

/// One message adding or deleting `ips` (all of one family) in `set`; no `ips` with
/// DELSETELEM flushes the set.
fn elements(kind: u16, seq: u32, set: &str, ips: &[IpAddr]) -> Vec<u8> {
    let create = if kind == NFT_MSG_NEWSETELEM {
        NLM_F_CREATE
    } else {
        0
    };
    let mut m = message(kind, NLM_F_REQUEST | NLM_F_ACK | create, seq);
    m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
        .str(NFTA_SET_ELEM_LIST_SET, set);
    if !ips.is_empty() {
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for ip in ips {
            m.begin(nft::NFTA_LIST_ELEM)
                .begin(NFTA_SET_ELEM_KEY)
                .attr(nft::NFTA_DATA_VALUE, &ip_key(*ip))
                .end()
                .end();
        }
        m.end();
    }
    m.finish()
}

/// The messages that create the table, sets and chain when missing and replace the chain's
/// rules, leaving the sets' contents alone. Each asks for an ack.
fn ensure(config: &RedirectConfig, seq: &mut impl FnMut() -> u32) -> Vec<Vec<u8>> {
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    let mut out = Vec::new();
    let mut table = message(nft::NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, seq());
    table.str(nft::NFTA_TABLE_NAME, TABLE);
    out.push(table.finish());
    for (name, id, kind, len) in [
        (SET_V4, SET_ID_V4, TYPE_IPADDR, 4),
        (SET_V6, SET_ID_V6, TYPE_IP6ADDR, 16),
    ] {
        let mut set = message(NFT_MSG_NEWSET, ack | NLM_F_CREATE, seq());
        set.str(NFTA_SET_TABLE, TABLE)
            .str(NFTA_SET_NAME, name)
            .be32(NFTA_SET_FLAGS, 0)
            .be32(NFTA_SET_KEY_TYPE, kind)
            .be32(NFTA_SET_KEY_LEN, len)
            .be32(NFTA_SET_ID, id);
        out.push(set.finish());
    }
    let mut chain = message(nft::NFT_MSG_NEWCHAIN, ack | NLM_F_CREATE, seq());
    chain
        .str(nft::NFTA_CHAIN_TABLE, TABLE)
        .str(nft::NFTA_CHAIN_NAME, CHAIN)
        .begin(nft::NFTA_CHAIN_HOOK)
        .be32(nft::NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING)
        .be32(nft::NFTA_HOOK_PRIORITY, NAT_SOURCE_PRIORITY as u32)
        .end()
        .be32(nft::NFTA_CHAIN_POLICY, nft::NF_ACCEPT)
        .str(nft::NFTA_CHAIN_TYPE, "nat");
    out.push(chain.finish());
    // Flush the chain (a rule deletion naming no rule), then add the rules: the same rules
    // afterwards however often this runs.
    let mut flush = message(NFT_MSG_DELRULE, ack, seq());
    flush
        .str(nft::NFTA_RULE_TABLE, TABLE)
        .str(nft::NFTA_RULE_CHAIN, CHAIN);
    out.push(flush.finish());
    for rule in chain_rules(config) {
        let mut m = message(
            nft::NFT_MSG_NEWRULE,
            ack | NLM_F_CREATE | nft::NLM_F_APPEND,
            seq(),
        );
        m.str(nft::NFTA_RULE_TABLE, TABLE)
            .str(nft::NFTA_RULE_CHAIN, CHAIN)
            .begin(nft::NFTA_RULE_EXPRESSIONS);
        for expr in &rule.exprs {
            nft::encode_expr(&mut m, expr);
        }
        m.end();
        out.push(m.finish());
    }
    out
}

/// Runs one batch: `body` builds the messages (each with an ack) between begin and end.
fn run_batch(
    nl: &mut Netlink,
    what: &str,
    body: impl FnOnce(&mut dyn FnMut() -> u32) -> Vec<Vec<u8>>,
) -> Result<(), (String, io::Error)> {
    let mut messages = vec![batch_edge(nft::NFNL_MSG_BATCH_BEGIN, nl.next_seq())];
    messages.extend(body(&mut || nl.next_seq()));
    let acks = messages.len() - 1;
    messages.push(batch_edge(nft::NFNL_MSG_BATCH_END, nl.next_seq()));
    nl.transact(&messages, acks)
        .map_err(|(index, e)| (format!("{what} (message {index} of the batch)"), e))
}

fn open() -> Result<Netlink, (String, io::Error)> {
    Netlink::open(SockProtocol::NetlinkNetFilter)
        .map_err(|e| ("opening a netfilter netlink socket".to_string(), e))
}

fn by_family(ips: &[IpAddr]) -> [(&'static str, Vec<IpAddr>); 2] {
    [
        (
            SET_V4,
            ips.iter().copied().filter(IpAddr::is_ipv4).collect(),
        ),
        (
            SET_V6,
            ips.iter().copied().filter(IpAddr::is_ipv6).collect(),
        ),
    ]
}

/// Creates the table, sets and rule in `netns` (the node's namespace) when missing and
/// re-programs the rules; the sets keep their contents. Idempotent.
pub fn install(
    netns: BorrowedFd<'_>,
    name: &str,
    config: &RedirectConfig,
) -> Result<(), RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open()?;
        run_batch(
            &mut nl,
            &format!("installing table inet {TABLE} (kernel without nf_tables nat/set support?)"),
            |mut seq| ensure(config, &mut seq),
        )
    })
}

/// Like [`install`], and makes the sets hold exactly `ips`, in one atomic step (for an agent
/// starting up: entries of pods it no longer captures go, entries of captured pods never blink).
pub fn sync(
    netns: BorrowedFd<'_>,
    name: &str,
    config: &RedirectConfig,
    ips: &[IpAddr],
) -> Result<(), RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open()?;
        run_batch(
            &mut nl,
            &format!("synchronizing table inet {TABLE}"),
            |mut seq| {
                let mut out = ensure(config, &mut seq);
                for (set, ips) in by_family(ips) {
                    out.push(elements(NFT_MSG_DELSETELEM, seq(), set, &[]));
                    if !ips.is_empty() {
                        out.push(elements(NFT_MSG_NEWSETELEM, seq(), set, &ips));
                    }
                }
                out
            },
        )
    })
}

/// Adds a captured pod's IPs to the sets (installing the table first if it is missing).
/// Idempotent.
pub fn add(
    netns: BorrowedFd<'_>,
    name: &str,
    config: &RedirectConfig,
    ips: &[IpAddr],
) -> Result<(), RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open()?;
        run_batch(
            &mut nl,
            &format!("adding {ips:?} to table inet {TABLE}"),
            |mut seq| {
                let mut out = ensure(config, &mut seq);
                for (set, ips) in by_family(ips) {
                    if !ips.is_empty() {
                        out.push(elements(NFT_MSG_NEWSETELEM, seq(), set, &ips));
                    }
                }
                out
            },
        )
    })
}

/// Removes a released pod's IPs from the sets. Addresses that are not there (or no table at
/// all) are fine. Idempotent.
pub fn remove(netns: BorrowedFd<'_>, name: &str, ips: &[IpAddr]) -> Result<(), RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open()?;
        for ip in ips {
            // One batch per address: a batch fails whole when one element is missing.
            match run_batch(
                &mut nl,
                &format!("removing {ip} from set {}", set_of(*ip)),
                |seq| vec![elements(NFT_MSG_DELSETELEM, seq(), set_of(*ip), &[*ip])],
            ) {
                Ok(()) => {}
                Err((_, e)) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

fn list_set(nl: &mut Netlink, set: &str) -> Result<Option<Vec<IpAddr>>, (String, io::Error)> {
    let seq = nl.next_seq();
    let mut m = message(NFT_MSG_GETSETELEM, NLM_F_REQUEST | netlink::NLM_F_DUMP, seq);
    m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
        .str(NFTA_SET_ELEM_LIST_SET, set);
    let replies = match nl.request(m.finish()) {
        Ok(replies) => replies,
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => return Ok(None),
        Err(e) => return Err((format!("listing set {set} of table inet {TABLE}"), e)),
    };
    let mut out = Vec::new();
    for reply in replies {
        for (kind, value) in netlink::attributes(reply.payload.get(4..).unwrap_or_default()) {
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for (_, element) in netlink::attributes(value) {
                for (kind, key) in netlink::attributes(element) {
                    if kind != NFTA_SET_ELEM_KEY {
                        continue;
                    }
                    for (kind, bytes) in netlink::attributes(key) {
                        if kind != nft::NFTA_DATA_VALUE {
                            continue;
                        }
                        if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
                            out.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
                            out.push(IpAddr::from(v6));
                        }
                    }
                }
            }
        }
    }
    out.sort();
    Ok(Some(out))
}

/// The pod IPs in the sets, or `None` when the table is not installed.
pub fn list(netns: BorrowedFd<'_>, name: &str) -> Result<Option<Vec<IpAddr>>, RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open()?;
        let Some(mut all) = list_set(&mut nl, SET_V4)? else {
            return Ok(None);
        };
        all.extend(list_set(&mut nl, SET_V6)?.unwrap_or_default());
        Ok(Some(all))
    })
}

/// Deletes the table when its sets are empty (no captured pod left whose probes need it).
pub fn remove_if_empty(netns: BorrowedFd<'_>, name: &str) -> Result<HostRemoval, RedirectError> {
    in_netns(netns, name, || {
        let mut nl = open()?;
        let Some(mut all) = list_set(&mut nl, SET_V4)? else {
            return Ok(HostRemoval::Absent);
        };
        all.extend(list_set(&mut nl, SET_V6)?.unwrap_or_default());
        if !all.is_empty() {
            return Ok(HostRemoval::Kept(all));
        }
        let result = run_batch(&mut nl, &format!("deleting table inet {TABLE}"), |seq| {
            let mut m = message(nft::NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, seq());
            m.str(nft::NFTA_TABLE_NAME, TABLE);
            vec![m.finish()]
        });
        match result {
            Ok(()) => Ok(HostRemoval::Removed),
            Err((_, e)) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => {
                Ok(HostRemoval::Absent)
            }
            Err(e) => Err(e),
        }
    })
}
