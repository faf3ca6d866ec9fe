//! Policy routing that returns the application's replies to ztunnel: packets carrying the
//! connection mark are looked up in a table whose only route delivers everything locally.

use std::io;

use crate::RedirectConfig;
use crate::netlink::{Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, Netlink};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const LOOPBACK_IFINDEX: u32 = 1;

fn families(config: &RedirectConfig) -> Vec<u8> {
    let mut out = vec![AF_INET];
    if config.ipv6 {
        out.push(AF_INET6);
    }
    out
}

fn rule_message(kind: u16, flags: u16, seq: u32, family: u8, config: &RedirectConfig) -> Vec<u8> {
    let table = u8::try_from(config.route_table).unwrap_or(0);
    let header = [family, 0, 0, 0, table, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    let mut m = Message::new(kind, flags, seq, &header);
    m.ne32(FRA_PRIORITY, config.rule_priority)
        .ne32(FRA_FWMARK, config.connection_mark)
        .ne32(FRA_FWMASK, config.mark_mask)
        .ne32(FRA_TABLE, config.route_table);
    m.finish()
}

fn route_message(kind: u16, flags: u16, seq: u32, family: u8, config: &RedirectConfig) -> Vec<u8> {
    let table = u8::try_from(config.route_table).unwrap_or(0);
    let header = [
        family,
        0,
        0,
        0,
        table,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    let mut m = Message::new(kind, flags, seq, &header);
    m.ne32(RTA_OIF, LOOPBACK_IFINDEX)
        .ne32(RTA_TABLE, config.route_table);
    m.finish()
}

fn ignore(error: io::Error, benign: &[i32]) -> io::Result<()> {
    match error.raw_os_error() {
        Some(code) if benign.contains(&code) => Ok(()),
        _ => Err(error),
    }
}

/// Adds the fwmark rule and the local route (already present is fine).
pub(crate) fn install(
    netlink: &mut Netlink,
    config: &RedirectConfig,
) -> Result<(), (String, io::Error)> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    for family in families(config) {
        let seq = netlink.next_seq();
        netlink
            .transact(&[rule_message(RTM_NEWRULE, flags, seq, family, config)], 1)
            .or_else(|(_, e)| ignore(e, &[libc_eexist()]))
            .map_err(|e| {
                (
                    format!(
                        "ip rule fwmark {:#x}/{:#x} lookup {}",
                        config.connection_mark, config.mark_mask, config.route_table
                    ),
                    e,
                )
            })?;
        let seq = netlink.next_seq();
        netlink
            .transact(
                &[route_message(RTM_NEWROUTE, flags, seq, family, config)],
                1,
            )
            .or_else(|(_, e)| ignore(e, &[libc_eexist()]))
            .map_err(|e| {
                (
                    format!("ip route local default dev lo table {}", config.route_table),
                    e,
                )
            })?;
    }
    Ok(())
}

/// Removes them (absent is fine).
pub(crate) fn remove(
    netlink: &mut Netlink,
    config: &RedirectConfig,
) -> Result<(), (String, io::Error)> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    for family in families(config) {
        let seq = netlink.next_seq();
        netlink
            .transact(&[rule_message(RTM_DELRULE, flags, seq, family, config)], 1)
            .or_else(|(_, e)| ignore(e, &[2, 3]))
            .map_err(|e| ("deleting the fwmark rule".to_string(), e))?;
        let seq = netlink.next_seq();
        netlink
            .transact(
                &[route_message(RTM_DELROUTE, flags, seq, family, config)],
                1,
            )
            .or_else(|(_, e)| ignore(e, &[2, 3]))
            .map_err(|e| ("deleting the local route".to_string(), e))?;
    }
    Ok(())
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}
