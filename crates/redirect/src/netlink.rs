//! Just enough netlink to program nf_tables and policy routing: message and attribute encoding,
//! a request/acknowledge exchange, and attribute walking for replies. Numbers follow
//! `linux/netlink.h`, `linux/netfilter/nf_tables.h`, `linux/fib_rules.h` and `linux/rtnetlink.h`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 0x8000;

/// A netlink socket of one protocol, opened in the calling thread's network namespace.
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// One message received in reply.
pub(crate) struct Reply {
    pub(crate) kind: u16,
    pub(crate) payload: Vec<u8>,
}

impl Netlink {
    pub(crate) fn open(protocol: SockProtocol) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Self { fd, seq: 1 })
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends `messages` in one write and waits for one ack per message that asked for it.
    /// Returns the first error the kernel reported, with the message index it belongs to.
    pub(crate) fn transact(
        &mut self,
        messages: &[Vec<u8>],
        acks: usize,
    ) -> Result<(), (usize, io::Error)> {
        let buffer: Vec<u8> = messages.concat();
        send(self.fd.as_raw_fd(), &buffer, MsgFlags::empty()).map_err(|e| (0, e.into()))?;
        let first_seq = header_seq(&messages[0]);
        let mut seen = 0;
        let mut failure = None;
        while seen < acks {
            for reply in self.receive().map_err(|e| (0, e))? {
                if reply.kind == NLMSG_ERROR {
                    seen += 1;
                    let errno =
                        i32::from_ne_bytes(reply.payload[0..4].try_into().expect("4 bytes"));
                    if errno != 0 && failure.is_none() {
                        let seq = header_seq(&reply.payload[4..]);
                        let index = seq.wrapping_sub(first_seq) as usize;
                        failure = Some((index, io::Error::from_raw_os_error(-errno)));
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Sends one request and collects the replies until DONE or an ack/error.
    pub(crate) fn request(&mut self, message: Vec<u8>) -> io::Result<Vec<Reply>> {
        send(self.fd.as_raw_fd(), &message, MsgFlags::empty())?;
        let mut out = Vec::new();
        loop {
            for reply in self.receive()? {
                match reply.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno =
                            i32::from_ne_bytes(reply.payload[0..4].try_into().expect("4 bytes"));
                        return if errno == 0 {
                            Ok(out)
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    _ => out.push(reply),
                }
            }
        }
    }

    fn receive(&mut self) -> io::Result<Vec<Reply>> {
        let mut buffer = vec![0u8; 64 * 1024];
        let n = recv(self.fd.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        let mut replies = Vec::new();
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buffer[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buffer[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < 16 || at + len > n {
                break;
            }
            replies.push(Reply {
                kind,
                payload: buffer[at + 16..at + len].to_vec(),
            });
            at += align(len);
        }
        Ok(replies)
    }
}

fn header_seq(message: &[u8]) -> u32 {
    u32::from_ne_bytes(message[8..12].try_into().expect("a netlink header"))
}

pub(crate) fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Builds one netlink message: header, fixed family header, attributes.
pub(crate) struct Message {
    buffer: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    pub(crate) fn new(kind: u16, flags: u16, seq: u32, family_header: &[u8]) -> Self {
        let mut buffer = Vec::with_capacity(256);
        buffer.extend_from_slice(&0u32.to_ne_bytes());
        buffer.extend_from_slice(&kind.to_ne_bytes());
        buffer.extend_from_slice(&flags.to_ne_bytes());
        buffer.extend_from_slice(&seq.to_ne_bytes());
        buffer.extend_from_slice(&0u32.to_ne_bytes());
        buffer.extend_from_slice(family_header);
        pad(&mut buffer);
        Self {
            buffer,
            nests: Vec::new(),
        }
    }

    pub(crate) fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.buffer.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buffer.extend_from_slice(&kind.to_ne_bytes());
        self.buffer.extend_from_slice(value);
        pad(&mut self.buffer);
        self
    }

    pub(crate) fn str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    pub(crate) fn be32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_be_bytes())
    }

    pub(crate) fn ne32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    pub(crate) fn begin(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buffer.len());
        self.buffer.extend_from_slice(&0u16.to_ne_bytes());
        self.buffer
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub(crate) fn end(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end() matches a begin()");
        let len = (self.buffer.len() - start) as u16;
        self.buffer[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "every begin() has its end()");
        let len = self.buffer.len() as u32;
        self.buffer[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buffer
    }
}

fn pad(buffer: &mut Vec<u8>) {
    buffer.resize(align(buffer.len()), 0);
}

/// Walks the attributes in `data`: (type without flags, payload).
pub(crate) fn attributes(data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let len = u16::from_ne_bytes([data[at], data[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([data[at + 2], data[at + 3]]) & 0x3fff;
        if len < 4 || at + len > data.len() {
            break;
        }
        out.push((kind, &data[at + 4..at + len]));
        at += align(len);
    }
    out
}
