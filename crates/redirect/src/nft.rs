//! The in-pod nftables rule set, as expressions the kernel executes and as the `nft` text an
//! operator reads. One table (`inet ambit`) holds everything, so removal is one deletion.

use std::net::IpAddr;

use crate::RedirectConfig;
use crate::netlink::{Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};

pub(crate) const TABLE: &str = "ambit";
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_GETRULE: u16 = 7;
pub(crate) const NLM_F_APPEND: u16 = 0x800;

pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
pub(crate) const NF_ACCEPT: u32 = 1;
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;

const META_MARK: u32 = 3;
const META_SKUID: u32 = 10;
const META_OIF: u32 = 5;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_MARK: u32 = 3;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;

/// One nftables expression.
#[derive(Clone, Debug)]
pub(crate) enum Expr {
    MetaLoad(u32),
    MetaSet(u32),
    CtLoad(u32),
    CtSet(u32),
    Payload {
        base: u32,
        offset: u32,
        len: u32,
    },
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Cmp {
        op: u32,
        data: Vec<u8>,
    },
    ImmediateData(Vec<u8>),
    Accept,
    Redirect,
    /// Match register 1 against a named set (created in the same batch with `set_id`).
    Lookup {
        set: &'static str,
        set_id: u32,
    },
    /// Source NAT to the address in register 1.
    Snat {
        nfproto: u8,
    },
}

/// A rule: its expressions and its `nft` text.
#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub(crate) exprs: Vec<Expr>,
    pub(crate) text: String,
}

/// A base chain and its rules.
#[derive(Clone, Debug)]
pub(crate) struct Chain {
    pub(crate) name: &'static str,
    kind: &'static str,
    hook: u32,
    priority: i32,
    pub(crate) rules: Vec<Rule>,
}

/// Builds a rule from matches, then a final statement.
pub(crate) struct RuleBuilder {
    exprs: Vec<Expr>,
    text: Vec<String>,
}

#[derive(Clone, Copy)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn nfproto(self) -> u8 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }
    fn keyword(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::from([127, 0, 0, 1]),
            Family::V6 => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    }
    /// (offset, length) of the source and destination addresses in the network header.
    fn addresses(self) -> ((u32, u32), (u32, u32)) {
        match self {
            Family::V4 => ((12, 4), (16, 4)),
            Family::V6 => ((8, 16), (24, 16)),
        }
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl RuleBuilder {
    pub(crate) fn new() -> Self {
        Self {
            exprs: Vec::new(),
            text: Vec::new(),
        }
    }

    fn family(mut self, family: Family) -> Self {
        self.exprs.push(Expr::MetaLoad(META_NFPROTO));
        self.exprs.push(Expr::Cmp {
            op: CMP_EQ,
            data: vec![family.nfproto()],
        });
        self
    }

    fn address(mut self, family: Family, source: bool, equal: bool, ip: IpAddr) -> Self {
        let (saddr, daddr) = family.addresses();
        let (offset, len) = if source { saddr } else { daddr };
        self = self.family(family);
        self.exprs.push(Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset,
            len,
        });
        self.exprs.push(Expr::Cmp {
            op: if equal { CMP_EQ } else { CMP_NEQ },
            data: ip_bytes(ip),
        });
        self.text.push(format!(
            "{} {} {}{ip}",
            family.keyword(),
            if source { "saddr" } else { "daddr" },
            if equal { "" } else { "!= " }
        ));
        self
    }

    pub(crate) fn tcp(mut self) -> Self {
        self.exprs.push(Expr::MetaLoad(META_L4PROTO));
        self.exprs.push(Expr::Cmp {
            op: CMP_EQ,
            data: vec![6],
        });
        self.text.push("meta l4proto tcp".into());
        self
    }

    fn dport_not(mut self, port: u16) -> Self {
        self.exprs.push(Expr::Payload {
            base: PAYLOAD_TRANSPORT,
            offset: 2,
            len: 2,
        });
        self.exprs.push(Expr::Cmp {
            op: CMP_NEQ,
            data: port.to_be_bytes().to_vec(),
        });
        self.text.push(format!("tcp dport != {port}"));
        self
    }

    fn masked(mut self, load: Expr, what: &str, mask: u32, equal: bool, value: u32) -> Self {
        self.exprs.push(load);
        self.exprs.push(Expr::Bitwise {
            mask: mask.to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        });
        self.exprs.push(Expr::Cmp {
            op: if equal { CMP_EQ } else { CMP_NEQ },
            data: value.to_ne_bytes().to_vec(),
        });
        self.text.push(format!(
            "{what} & {mask:#x} {}{value:#x}",
            if equal { "== " } else { "!= " }
        ));
        self
    }

    fn mark(self, mask: u32, equal: bool, value: u32) -> Self {
        self.masked(Expr::MetaLoad(META_MARK), "meta mark", mask, equal, value)
    }

    fn ct_mark(self, mask: u32, equal: bool, value: u32) -> Self {
        self.masked(Expr::CtLoad(CT_MARK), "ct mark", mask, equal, value)
    }

    fn oif_loopback(mut self) -> Self {
        // The loopback device is always interface 1 in a network namespace.
        self.exprs.push(Expr::MetaLoad(META_OIF));
        self.exprs.push(Expr::Cmp {
            op: CMP_EQ,
            data: 1u32.to_ne_bytes().to_vec(),
        });
        self.text.push("oif \"lo\"".into());
        self
    }

    /// Matches packets a local socket sent (the socket's owner is readable; forwarded packets
    /// have no socket, so the load fails and the rule does not match).
    pub(crate) fn local_socket(mut self) -> Self {
        self.exprs.push(Expr::MetaLoad(META_SKUID));
        self.exprs.push(Expr::Cmp {
            op: CMP_NEQ,
            data: u32::MAX.to_ne_bytes().to_vec(),
        });
        self.text.push(format!("meta skuid != {}", u32::MAX));
        self
    }

    /// Matches when the destination address is in `set`.
    pub(crate) fn daddr_in(mut self, family: Family, set: &'static str, set_id: u32) -> Self {
        let (_, (offset, len)) = family.addresses();
        self = self.family(family);
        self.exprs.push(Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset,
            len,
        });
        self.exprs.push(Expr::Lookup { set, set_id });
        self.text.push(format!("{} daddr @{set}", family.keyword()));
        self
    }

    /// `snat ip to <address>`.
    pub(crate) fn snat(mut self, family: Family, to: IpAddr) -> Rule {
        self.exprs.push(Expr::ImmediateData(ip_bytes(to)));
        self.exprs.push(Expr::Snat {
            nfproto: family.nfproto(),
        });
        self.text.push(format!("snat {} to {to}", family.keyword()));
        self.build()
    }

    fn accept(mut self) -> Rule {
        self.exprs.push(Expr::Accept);
        self.text.push("accept".into());
        self.build()
    }

    fn redirect(mut self, port: u16) -> Rule {
        self.exprs
            .push(Expr::ImmediateData(port.to_be_bytes().to_vec()));
        self.exprs.push(Expr::Redirect);
        self.text.push(format!("redirect to :{port}"));
        self.build()
    }

    /// `ct mark set ct mark & ~mask ^ value`.
    fn set_ct_mark(mut self, mask: u32, value: u32) -> Rule {
        self.exprs.push(Expr::CtLoad(CT_MARK));
        self.exprs.push(Expr::Bitwise {
            mask: (!mask).to_ne_bytes().to_vec(),
            xor: value.to_ne_bytes().to_vec(),
        });
        self.exprs.push(Expr::CtSet(CT_MARK));
        self.text
            .push(format!("ct mark set ct mark & {:#x} ^ {value:#x}", !mask));
        self.build()
    }

    /// `meta mark set ct mark`.
    fn restore_mark(mut self) -> Rule {
        self.exprs.push(Expr::CtLoad(CT_MARK));
        self.exprs.push(Expr::MetaSet(META_MARK));
        self.text.push("meta mark set ct mark".into());
        self.build()
    }

    fn build(self) -> Rule {
        Rule {
            exprs: self.exprs,
            text: self.text.join(" "),
        }
    }
}

/// The chains for `config`.
pub(crate) fn ruleset(config: &RedirectConfig) -> Vec<Chain> {
    let mask = config.mark_mask;
    let families: Vec<(Family, IpAddr)> =
        std::iter::once((Family::V4, IpAddr::V4(config.probe_v4)))
            .chain(
                config
                    .ipv6
                    .then_some((Family::V6, IpAddr::V6(config.probe_v6))),
            )
            .collect();

    let mut prerouting_nat = Vec::new();
    let mut output_nat = Vec::new();
    for &(family, probe) in &families {
        if config.capture_inbound {
            prerouting_nat.push(
                RuleBuilder::new()
                    .address(family, true, true, probe)
                    .tcp()
                    .accept(),
            );
        }
        output_nat.push(
            RuleBuilder::new()
                .address(family, false, true, probe)
                .tcp()
                .accept(),
        );
    }
    output_nat.push(
        RuleBuilder::new()
            .tcp()
            .mark(mask, true, config.connection_mark)
            .accept(),
    );
    for &(family, _) in &families {
        if config.capture_inbound {
            prerouting_nat.push(
                RuleBuilder::new()
                    .address(family, false, false, family.loopback())
                    .tcp()
                    .dport_not(config.hbone_port)
                    .mark(mask, false, config.ztunnel_mark)
                    .redirect(config.inbound_port),
            );
        }
        output_nat.push(
            RuleBuilder::new()
                .oif_loopback()
                .address(family, false, false, family.loopback())
                .accept(),
        );
        output_nat.push(
            RuleBuilder::new()
                .address(family, false, false, family.loopback())
                .tcp()
                .mark(mask, false, config.ztunnel_mark)
                .redirect(config.outbound_port),
        );
    }

    vec![
        Chain {
            name: "prerouting-mangle",
            kind: "filter",
            hook: NF_INET_PRE_ROUTING,
            priority: -150,
            rules: vec![
                RuleBuilder::new()
                    .mark(mask, true, config.ztunnel_mark)
                    .set_ct_mark(mask, config.connection_mark),
            ],
        },
        Chain {
            name: "output-route",
            kind: "route",
            hook: NF_INET_LOCAL_OUT,
            priority: -150,
            rules: vec![
                RuleBuilder::new()
                    .ct_mark(mask, true, config.connection_mark)
                    .restore_mark(),
            ],
        },
        Chain {
            name: "prerouting-nat",
            kind: "nat",
            hook: NF_INET_PRE_ROUTING,
            priority: -100,
            rules: prerouting_nat,
        },
        Chain {
            name: "output-nat",
            kind: "nat",
            hook: NF_INET_LOCAL_OUT,
            priority: -100,
            rules: output_nat,
        },
    ]
}

/// The rule set as `nft list table` would print it.
pub(crate) fn text(chains: &[Chain]) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    for chain in chains {
        let hook = if chain.hook == NF_INET_PRE_ROUTING {
            "prerouting"
        } else {
            "output"
        };
        out.push_str(&format!(
            "\tchain {} {{\n\t\ttype {} hook {hook} priority {}; policy accept;\n",
            chain.name, chain.kind, chain.priority
        ));
        for rule in &chain.rules {
            out.push_str(&format!("\t\t{}\n", rule.text));
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

pub(crate) fn nft_type(message: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | message
}

/// The nfgenmsg header for `family`.
pub(crate) fn nfgen(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, 0, id[0], id[1]]
}

pub(crate) fn table_message(kind: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut m = Message::new(nft_type(kind), flags, seq, &nfgen(NFPROTO_INET, 0));
    m.str(NFTA_TABLE_NAME, TABLE);
    m.finish()
}

pub(crate) fn rule_dump(seq: u32) -> Vec<u8> {
    let mut m = Message::new(
        nft_type(NFT_MSG_GETRULE),
        NLM_F_REQUEST | crate::netlink::NLM_F_DUMP,
        seq,
        &nfgen(NFPROTO_INET, 0),
    );
    m.str(NFTA_RULE_TABLE, TABLE);
    m.finish()
}

/// The batch that atomically replaces our table with `chains`: ensure it exists, delete it,
/// create it again with everything in it. Returns the messages and how many acks to expect.
pub(crate) fn install_batch(
    chains: &[Chain],
    mut seq: impl FnMut() -> u32,
) -> (Vec<Vec<u8>>, usize) {
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    let mut messages = vec![
        Message::new(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq(),
            &nfgen(0, NFNL_SUBSYS_NFTABLES),
        )
        .finish(),
    ];
    messages.push(table_message(NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, seq()));
    messages.push(table_message(NFT_MSG_DELTABLE, ack, seq()));
    messages.push(table_message(NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, seq()));
    for chain in chains {
        let mut m = Message::new(
            nft_type(NFT_MSG_NEWCHAIN),
            ack | NLM_F_CREATE,
            seq(),
            &nfgen(NFPROTO_INET, 0),
        );
        m.str(NFTA_CHAIN_TABLE, TABLE)
            .str(NFTA_CHAIN_NAME, chain.name)
            .begin(NFTA_CHAIN_HOOK)
            .be32(NFTA_HOOK_HOOKNUM, chain.hook)
            .be32(NFTA_HOOK_PRIORITY, chain.priority as u32)
            .end()
            .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, chain.kind);
        messages.push(m.finish());
    }
    for chain in chains {
        for rule in &chain.rules {
            let mut m = Message::new(
                nft_type(NFT_MSG_NEWRULE),
                ack | NLM_F_CREATE | NLM_F_APPEND,
                seq(),
                &nfgen(NFPROTO_INET, 0),
            );
            m.str(NFTA_RULE_TABLE, TABLE)
                .str(NFTA_RULE_CHAIN, chain.name)
                .begin(NFTA_RULE_EXPRESSIONS);
            for expr in &rule.exprs {
                encode_expr(&mut m, expr);
            }
            m.end();
            messages.push(m.finish());
        }
    }
    let acks = messages.len() - 1;
    messages.push(
        Message::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq(),
            &nfgen(0, NFNL_SUBSYS_NFTABLES),
        )
        .finish(),
    );
    (messages, acks)
}

/// The batch that deletes our table.
pub(crate) fn remove_batch(mut seq: impl FnMut() -> u32) -> Vec<Vec<u8>> {
    vec![
        Message::new(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq(),
            &nfgen(0, NFNL_SUBSYS_NFTABLES),
        )
        .finish(),
        table_message(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, seq()),
        Message::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq(),
            &nfgen(0, NFNL_SUBSYS_NFTABLES),
        )
        .finish(),
    ]
}

fn data(m: &mut Message, kind: u16, bytes: &[u8]) {
    m.begin(kind).attr(NFTA_DATA_VALUE, bytes).end();
}

pub(crate) fn encode_expr(m: &mut Message, expr: &Expr) {
    let name = match expr {
        Expr::MetaLoad(_) | Expr::MetaSet(_) => "meta",
        Expr::CtLoad(_) | Expr::CtSet(_) => "ct",
        Expr::Payload { .. } => "payload",
        Expr::Bitwise { .. } => "bitwise",
        Expr::Cmp { .. } => "cmp",
        Expr::ImmediateData(_) | Expr::Accept => "immediate",
        Expr::Redirect => "redir",
        Expr::Lookup { .. } => "lookup",
        Expr::Snat { .. } => "nat",
    };
    m.begin(NFTA_LIST_ELEM)
        .str(NFTA_EXPR_NAME, name)
        .begin(NFTA_EXPR_DATA);
    match expr {
        // meta / ct: DREG=1, KEY=2; set uses SREG (meta 3, ct 4).
        Expr::MetaLoad(key) | Expr::CtLoad(key) => {
            m.be32(1, REG_1).be32(2, *key);
        }
        Expr::MetaSet(key) => {
            m.be32(2, *key).be32(3, REG_1);
        }
        Expr::CtSet(key) => {
            m.be32(2, *key).be32(4, REG_1);
        }
        Expr::Payload { base, offset, len } => {
            m.be32(1, REG_1)
                .be32(2, *base)
                .be32(3, *offset)
                .be32(4, *len);
        }
        Expr::Bitwise { mask, xor } => {
            m.be32(1, REG_1).be32(2, REG_1).be32(3, mask.len() as u32);
            data(m, 4, mask);
            data(m, 5, xor);
        }
        Expr::Cmp { op, data: bytes } => {
            m.be32(1, REG_1).be32(2, *op);
            data(m, 3, bytes);
        }
        Expr::ImmediateData(bytes) => {
            m.be32(1, REG_1);
            data(m, 2, bytes);
        }
        Expr::Accept => {
            m.be32(1, REG_VERDICT)
                .begin(2)
                .begin(NFTA_DATA_VERDICT)
                .be32(NFTA_VERDICT_CODE, NF_ACCEPT)
                .end()
                .end();
        }
        Expr::Redirect => {
            m.be32(1, REG_1);
        }
        // NFTA_LOOKUP_SET 1, SREG 2, SET_ID 4.
        Expr::Lookup { set, set_id } => {
            m.str(1, set).be32(2, REG_1).be32(4, *set_id);
        }
        // NFTA_NAT_TYPE 1 (NFT_NAT_SNAT 0), FAMILY 2, REG_ADDR_MIN 3.
        Expr::Snat { nfproto } => {
            m.be32(1, 0).be32(2, u32::from(*nfproto)).be32(3, REG_1);
        }
    }
    m.end().end();
}
