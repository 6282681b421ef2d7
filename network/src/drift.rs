//! Drift: one difference between a bond's spec and the live node.

use serde::Serialize;

use crate::qos::fmt_bps;
use crate::spec::TrafficKind;

/// One difference between desired and observed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "drift", rename_all = "kebab-case")]
pub enum Drift {
    /// The bond device does not exist.
    DeviceMissing,
    /// The bond device is down.
    DeviceDown,
    /// A device of the bond's name exists with another kind.
    WrongDeviceKind {
        /// Expected kind.
        want: String,
        /// Found kind.
        have: String,
    },
    /// MTU differs.
    MtuChanged {
        /// Device.
        device: String,
        /// Spec.
        want: u32,
        /// Live.
        have: u32,
    },
    /// Kernel bond mode differs.
    ModeChanged {
        /// Spec.
        want: String,
        /// Live.
        have: String,
    },
    /// Bond miimon differs.
    MiimonChanged {
        /// Spec.
        want: u32,
        /// Live.
        have: u32,
    },
    /// The fallback bridge's MAC is not the bond's stable MAC.
    MacChanged,
    /// A member NIC no longer exists on the node.
    MemberGone {
        /// Member.
        member: String,
    },
    /// A member NIC is administratively down.
    MemberDown {
        /// Member.
        member: String,
    },
    /// A member is not enslaved (kernel bond).
    MemberDetached {
        /// Member.
        member: String,
    },
    /// Fallback: no member is attached to the bridge.
    NoActiveMember,
    /// Fallback: the attached member has no carrier while another has.
    ActiveMemberDead {
        /// The dead active member.
        member: String,
    },
    /// A device not in the spec is attached to the bond.
    UnexpectedPort {
        /// The port.
        port: String,
    },
    /// No HTB root qdisc `1:`.
    QdiscMissing {
        /// The root qdisc kind found instead, if any.
        have: Option<String>,
    },
    /// An HTB root exists although the spec has no classes.
    UnexpectedQdisc {
        /// Kind.
        kind: String,
    },
    /// The HTB default class differs.
    DefaultClassChanged {
        /// Spec minor.
        want: u16,
        /// Live minor.
        have: Option<u16>,
    },
    /// Class `1:1` is missing.
    CapacityClassMissing,
    /// Class `1:1` has another rate.
    CapacityChanged {
        /// Spec.
        want_bps: u64,
        /// Live.
        have_bps: u64,
    },
    /// A traffic class is missing.
    ClassMissing {
        /// Class.
        class: TrafficKind,
    },
    /// A traffic class's guaranteed rate differs.
    ClassRateChanged {
        /// Class.
        class: TrafficKind,
        /// Spec.
        want_bps: u64,
        /// Live.
        have_bps: u64,
    },
    /// A traffic class's ceiling differs.
    ClassCeilChanged {
        /// Class.
        class: TrafficKind,
        /// Spec.
        want_bps: u64,
        /// Live.
        have_bps: u64,
    },
    /// A traffic class's quantum (weight) or priority differs.
    ClassShareChanged {
        /// Class.
        class: TrafficKind,
        /// Spec quantum.
        want_quantum: u32,
        /// Live quantum.
        have_quantum: u32,
    },
    /// An HTB class not in the spec.
    UnexpectedClass {
        /// Minor id.
        minor: u16,
    },
    /// The steering filters differ from the plan.
    FiltersChanged {
        /// Planned count.
        want: usize,
        /// Live count.
        have: usize,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::DeviceMissing => write!(f, "bond device is missing"),
            Drift::DeviceDown => write!(f, "bond device is down"),
            Drift::WrongDeviceKind { want, have } => {
                write!(f, "device is a {have}, expected a {want}")
            }
            Drift::MtuChanged { device, want, have } => {
                write!(f, "{device} has mtu {have}, spec says {want}")
            }
            Drift::ModeChanged { want, have } => write!(f, "bond mode is {have}, spec says {want}"),
            Drift::MiimonChanged { want, have } => {
                write!(f, "miimon is {have} ms, spec says {want} ms")
            }
            Drift::MacChanged => write!(f, "bond MAC address changed"),
            Drift::MemberGone { member } => {
                write!(f, "member {member} no longer exists on the node")
            }
            Drift::MemberDown { member } => write!(f, "member {member} is administratively down"),
            Drift::MemberDetached { member } => {
                write!(f, "member {member} is not part of the bond")
            }
            Drift::NoActiveMember => write!(f, "no member is active"),
            Drift::ActiveMemberDead { member } => {
                write!(f, "active member {member} has no carrier")
            }
            Drift::UnexpectedPort { port } => write!(f, "{port} is attached but not a member"),
            Drift::QdiscMissing { have } => match have {
                Some(k) => write!(f, "root qdisc is {k}, expected htb 1:"),
                None => write!(f, "no htb root qdisc"),
            },
            Drift::UnexpectedQdisc { kind } => {
                write!(f, "root qdisc {kind} present but the spec has no classes")
            }
            Drift::DefaultClassChanged { want, have } => {
                write!(f, "default class is {have:?}, expected 1:{want:x}")
            }
            Drift::CapacityClassMissing => write!(f, "capacity class 1:1 is missing"),
            Drift::CapacityChanged { want_bps, have_bps } => {
                write!(
                    f,
                    "capacity class at {}, expected {}",
                    fmt_bps(*have_bps),
                    fmt_bps(*want_bps)
                )
            }
            Drift::ClassMissing { class } => write!(f, "traffic class {class} was deleted"),
            Drift::ClassRateChanged {
                class,
                want_bps,
                have_bps,
            } => write!(
                f,
                "traffic class {class} min is {}, spec says {}",
                fmt_bps(*have_bps),
                fmt_bps(*want_bps)
            ),
            Drift::ClassCeilChanged {
                class,
                want_bps,
                have_bps,
            } => write!(
                f,
                "traffic class {class} max is {}, spec says {}",
                fmt_bps(*have_bps),
                fmt_bps(*want_bps)
            ),
            Drift::ClassShareChanged {
                class,
                want_quantum,
                have_quantum,
            } => write!(
                f,
                "traffic class {class} quantum is {have_quantum}, weight asks for {want_quantum}"
            ),
            Drift::UnexpectedClass { minor } => write!(f, "class 1:{minor:x} is not in the spec"),
            Drift::FiltersChanged { want, have } => {
                if have == want {
                    write!(
                        f,
                        "the {have} steering filters differ from the {want} the spec needs"
                    )
                } else {
                    write!(
                        f,
                        "{have} steering filters found where the spec needs {want}"
                    )
                }
            }
        }
    }
}
