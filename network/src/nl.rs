//! A small synchronous rtnetlink client over `netlink-sys` and
//! `netlink-packet-route`: links, addresses, and tc dumps.
//!
//! Synchronous on purpose: every call is one request and its answer, the
//! node agent calls it from a blocking reconcile step, and a socket is bound
//! to the namespace it was opened in (see [`crate::netns`]).

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::tc::TcMessage;
use netlink_packet_route::{AddressFamily, link::InfoVeth};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::netns::{NetNs, NetnsError};

/// Errors of the netlink client.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// Socket-level failure.
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel answered a request with an error.
    #[error("netlink {op} failed: {source}")]
    Kernel {
        /// The operation.
        op: String,
        /// The errno as an io error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel did not answer in time.
    #[error("netlink {op}: no answer from the kernel within {after:?}")]
    Timeout {
        /// The operation.
        op: String,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// The answer could not be decoded.
    #[error("cannot decode netlink answer: {0}")]
    Decode(String),
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A link looked up by name does not exist.
    #[error("no network device named `{0}`")]
    NoSuchLink(String),
}

impl NlError {
    /// The errno of a kernel error, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A link as read back over netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`bridge`, `veth`, `bond`, `tun`, ...), if any.
    pub kind: Option<String>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub admin_up: bool,
    /// Carrier present (`IFF_LOWER_UP`).
    pub carrier: bool,
    /// Index of the controller (bridge/bond) this link is attached to.
    pub controller: Option<u32>,
    /// Hardware address.
    pub mac: Option<[u8; 6]>,
    /// Transmit queue length.
    pub txqlen: u32,
    /// Bond mode number (`IFLA_BOND_MODE`), for bond links.
    pub bond_mode: Option<u8>,
    /// Bond miimon in ms, for bond links.
    pub bond_miimon: Option<u32>,
}

impl LinkState {
    /// Carrier up and administratively up: a member that can carry traffic.
    pub fn is_live(&self) -> bool {
        self.admin_up && self.carrier
    }
}

pub(crate) fn link_state_from(msg: &LinkMessage) -> LinkState {
    let mut st = LinkState {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        carrier: msg.header.flags.contains(LinkFlags::LowerUp),
        controller: None,
        mac: None,
        txqlen: 0,
        bond_mode: None,
        bond_miimon: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => st.name = n.clone(),
            LinkAttribute::Mtu(m) => st.mtu = *m,
            LinkAttribute::Controller(c) if *c != 0 => st.controller = Some(*c),
            LinkAttribute::TxQueueLen(q) => st.txqlen = *q,
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(a);
                st.mac = Some(mac);
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => st.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Bond(bond)) => {
                            for b in bond {
                                match b {
                                    netlink_packet_route::link::InfoBond::Mode(m) => {
                                        st.bond_mode = Some(u8::from(*m))
                                    }
                                    netlink_packet_route::link::InfoBond::MiiMon(m) => {
                                        st.bond_miimon = Some(*m)
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    st
}

/// An IPv6 address of a link as read back over netlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6AddressState {
    /// The address.
    pub addr: std::net::Ipv6Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Scope (`RT_SCOPE_*`: 0 global, 253 link, 254 host).
    pub scope: u8,
    /// Duplicate address detection has not finished (`IFA_F_TENTATIVE`).
    pub tentative: bool,
    /// Duplicate address detection found another owner (`IFA_F_DADFAILED`).
    pub dad_failed: bool,
    /// Usable while DAD runs, but must not override caches (`IFA_F_OPTIMISTIC`).
    pub optimistic: bool,
}

/// A synchronous rtnetlink connection bound to one network namespace.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a route netlink socket inside `ns`. Answers are awaited at most
    /// [`REQUEST_TIMEOUT`]: a kernel that never answers is an error, not a hang.
    pub fn open(ns: &NetNs) -> Result<Self, NlError> {
        let socket = ns.run(|| -> std::io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind_auto()?;
            s.connect(&SocketAddr::new(0, 0))?;
            Ok(s)
        })??;
        set_recv_timeout(&socket, REQUEST_TIMEOUT)?;
        Ok(Self { socket, seq: 1 })
    }

    /// Opens a socket in `ns` subscribed to link events (`RTNLGRP_LINK`),
    /// with `timeout` as the receive timeout.
    pub fn open_link_monitor(ns: &NetNs, timeout: std::time::Duration) -> Result<Self, NlError> {
        let socket = ns.run(|| -> std::io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind(&SocketAddr::new(0, 1 /* RTMGRP_LINK */))?;
            Ok(s)
        })??;
        set_recv_timeout(&socket, timeout)?;
        Ok(Self { socket, seq: 1 })
    }

    /// Waits for the next batch of multicast link events (or the timeout).
    /// Returns the links announced, empty on timeout.
    pub fn wait_link_events(&mut self) -> Result<Vec<LinkState>, NlError> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match self.socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(NlError::Io(e)),
        };
        let mut out = Vec::new();
        for msg in split_messages(&buf[..n])? {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l),
            ) = msg.payload
            {
                out.push(link_state_from(&l));
            }
        }
        Ok(out)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request and collects the answer messages until ACK/DONE.
    pub fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => NlError::Timeout {
                    op: op.to_owned(),
                    after: REQUEST_TIMEOUT,
                },
                _ => NlError::Io(e),
            })?;
            for m in split_messages(&data)? {
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(NlError::Kernel {
                                op: op.to_owned(),
                                source: e.to_io(),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Dumps all links.
    pub fn links(&mut self) -> Result<Vec<LinkState>, NlError> {
        let answers = self.request(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_state_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Looks a link up by name.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkState>, NlError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(
            &format!("get link {name}"),
            RouteNetlinkMessage::GetLink(msg),
            0,
        ) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_state_from(l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Looks a link up by name and fails if it does not exist.
    pub fn require_link(&mut self, name: &str) -> Result<LinkState, NlError> {
        self.link(name)?
            .ok_or_else(|| NlError::NoSuchLink(name.to_owned()))
    }

    /// Sends a prepared `RTM_NEWLINK` with create|excl|ack.
    pub fn create_link(&mut self, op: &str, msg: LinkMessage) -> Result<(), NlError> {
        self.request(
            op,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Sends a prepared `RTM_SETLINK`-style change (`RTM_NEWLINK` on an index).
    pub fn change_link(&mut self, op: &str, msg: LinkMessage) -> Result<(), NlError> {
        self.request(op, RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)
            .map(drop)
    }

    /// Creates a bridge with STP off, a fixed MAC, MTU and queue length.
    pub fn create_bridge(
        &mut self,
        name: &str,
        mac: Option<[u8; 6]>,
        mtu: Option<u32>,
    ) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        // A bridge is a noqueue device (txqueuelen 0); give it a real queue
        // length so HTB's default pfifo leaves do not end up with limit 1.
        msg.attributes.push(LinkAttribute::TxQueueLen(1000));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::StpState(netlink_packet_route::link::BridgeStpState::Disabled),
                InfoBridge::ForwardDelay(0),
            ])),
        ]));
        self.create_link(&format!("create bridge {name}"), msg)
    }

    /// Creates a veth pair; the peer is moved to `peer_ns` when given.
    pub fn create_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_ns: Option<&NetNs>,
    ) -> Result<(), NlError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        let _ns_file;
        if let Some(ns) = peer_ns.and_then(|n| n.name()) {
            let f = std::fs::File::open(format!("{}/{ns}", crate::netns::NETNS_RUN_DIR))?;
            use std::os::fd::AsRawFd;
            peer_msg
                .attributes
                .push(LinkAttribute::NetNsFd(f.as_raw_fd()));
            _ns_file = f;
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.create_link(&format!("create veth {name}/{peer}"), msg)
    }

    /// Deletes a link by name; a missing link is not an error.
    pub fn delete_link(&mut self, name: &str) -> Result<(), NlError> {
        let Some(link) = self.link(name)? else {
            return Ok(());
        };
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        self.request(
            &format!("delete link {name}"),
            RouteNetlinkMessage::DelLink(msg),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// Sets a link administratively up or down.
    pub fn set_link_up(&mut self, index: u32, up: bool) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        self.change_link(
            &format!("set link {index} {}", if up { "up" } else { "down" }),
            msg,
        )
    }

    /// Sets a link up or down by name.
    pub fn set_link_up_by_name(&mut self, name: &str, up: bool) -> Result<(), NlError> {
        let link = self.require_link(name)?;
        self.set_link_up(link.index, up)
    }

    /// Sets a link's MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.change_link(&format!("set mtu {mtu} on link {index}"), msg)
    }

    /// Sets a link's transmit queue length.
    pub fn set_txqlen(&mut self, index: u32, len: u32) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::TxQueueLen(len));
        self.change_link(&format!("set txqueuelen {len} on link {index}"), msg)
    }

    /// Attaches `index` to controller `controller` (0 detaches).
    pub fn set_controller(&mut self, index: u32, controller: u32) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Controller(controller));
        self.change_link(&format!("set controller {controller} on link {index}"), msg)
    }

    /// Adds an address to a link; an existing identical address is fine.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<(), NlError> {
        let mut msg = AddressMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        if addr.is_ipv6() {
            // No duplicate address detection: the address is usable at once
            // (the dev cluster's addresses are unique by construction).
            msg.header.flags = netlink_packet_route::address::AddressHeaderFlags::Nodad;
        }
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        match self.request(
            &format!("add address {addr}/{prefix_len}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// The address messages of `family` on link `index`.
    fn addresses_of(
        &mut self,
        family: AddressFamily,
        index: u32,
    ) -> Result<Vec<AddressMessage>, NlError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family;
        let answers = self.request(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(msg),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewAddress(a)
                    if a.header.index == index && a.header.family == family =>
                {
                    Some(a)
                }
                _ => None,
            })
            .collect())
    }

    /// IPv4 addresses configured on link `index`.
    pub fn ipv4_addresses(&mut self, index: u32) -> Result<Vec<std::net::Ipv4Addr>, NlError> {
        let mut out = Vec::new();
        for a in self.addresses_of(AddressFamily::Inet, index)? {
            for attr in &a.attributes {
                if let AddressAttribute::Local(IpAddr::V4(v4)) = attr {
                    out.push(*v4);
                }
            }
        }
        Ok(out)
    }

    /// IPv6 addresses configured on link `index`, with their scope and DAD
    /// state (a tentative or DAD-failed address is not yet, or never, the
    /// link's to use).
    pub fn ipv6_addresses(&mut self, index: u32) -> Result<Vec<Ipv6AddressState>, NlError> {
        let mut out = Vec::new();
        for a in self.addresses_of(AddressFamily::Inet6, index)? {
            // IFA_FLAGS (32 bits) supersedes the 8-bit header flags when present.
            let mut flags = u32::from(a.header.flags.bits());
            let mut addr = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Flags(f) => flags = f.bits(),
                    AddressAttribute::Address(IpAddr::V6(v6)) => addr = Some(*v6),
                    // IPv6 carries IFA_ADDRESS; IFA_LOCAL only on
                    // point-to-point links, where it is the local end.
                    AddressAttribute::Local(IpAddr::V6(v6)) => addr = addr.or(Some(*v6)),
                    _ => {}
                }
            }
            let Some(addr) = addr else { continue };
            out.push(Ipv6AddressState {
                addr,
                prefix_len: a.header.prefix_len,
                scope: u8::from(a.header.scope),
                tentative: flags & AddressFlags::Tentative.bits() != 0,
                dad_failed: flags & AddressFlags::Dadfailed.bits() != 0,
                optimistic: flags & AddressFlags::Optimistic.bits() != 0,
            });
        }
        Ok(out)
    }

    /// Dumps tc objects of one kind (`qdisc`, `class`, `filter`) on a link.
    pub fn tc_dump(
        &mut self,
        what: TcDump,
        index: u32,
        parent: Option<u32>,
    ) -> Result<Vec<TcMessage>, NlError> {
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        if let Some(p) = parent {
            msg.header.parent = p.into();
        }
        let req = match what {
            TcDump::Qdisc => RouteNetlinkMessage::GetQueueDiscipline(msg),
            TcDump::Class => RouteNetlinkMessage::GetTrafficClass(msg),
            TcDump::Filter => RouteNetlinkMessage::GetTrafficFilter(msg),
        };
        let answers = self.request(&format!("dump tc {what:?}"), req, NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(t)
                | RouteNetlinkMessage::NewTrafficClass(t)
                | RouteNetlinkMessage::NewTrafficFilter(t) => Some(t),
                _ => None,
            })
            .filter(|t| t.header.index == index as i32)
            .collect())
    }
}

/// How long a request waits for the kernel's answer.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn set_recv_timeout(socket: &Socket, timeout: std::time::Duration) -> Result<(), NlError> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: the fd is a valid socket owned by `socket`; tv is a valid
    // timeval whose size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(NlError::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Which tc objects to dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcDump {
    /// Queueing disciplines.
    Qdisc,
    /// Classes.
    Class,
    /// Filters.
    Filter,
}

fn split_messages(data: &[u8]) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, NlError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let rest = &data[offset..];
        let len = NetlinkBuffer::new_checked(rest)
            .map_err(|e| NlError::Decode(e.to_string()))?
            .length() as usize;
        if len == 0 || len > rest.len() {
            break;
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
            .map_err(|e| NlError::Decode(e.to_string()))?;
        out.push(msg);
        offset += (len + 3) & !3;
    }
    Ok(out)
}
