//! Counters of what the core did and what it dropped, by reason.

/// Why a frame was not handled. Every drop is counted under one of these.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum DropReason {
    /// Shorter than its headers say, or a header field out of range.
    Malformed,
    /// A checksum did not verify.
    BadChecksum,
    /// For another MAC, or an EtherType we do not speak (IPv6, VLAN, ...).
    Foreign,
    /// SecureNAT, NAT or DHCP is disabled.
    Disabled,
    /// A session or table limit was reached.
    Limit,
    /// A destination that would loop back into hubnat itself.
    Loop,
    /// The guest's MAC for an address is not known yet.
    NoArp,
    /// Not a protocol or message the virtual host handles.
    Unsupported,
    /// An inter-thread queue or socket buffer was full.
    QueueFull,
    /// The egress policy refuses the destination (`nat::policy`).
    Policy,
    /// A source address another guest holds (`vhost::bindings`), or a DHCP message about
    /// another client's lease.
    Spoofed,
    /// Its TTL ended at the virtual host on the way elsewhere (the guest got time exceeded).
    TtlExceeded,
    /// The host has no route to its destination (the guest got destination unreachable).
    NoRoute,
}

impl DropReason {
    /// Every reason, in the order of their index in `Stats::drops`.
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::BadChecksum,
        DropReason::Foreign,
        DropReason::Disabled,
        DropReason::Limit,
        DropReason::Loop,
        DropReason::NoArp,
        DropReason::Unsupported,
        DropReason::QueueFull,
        DropReason::Policy,
        DropReason::Spoofed,
        DropReason::TtlExceeded,
        DropReason::NoRoute,
    ];

    /// Its name in the statistics the operator reads (`bad_checksum`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::Foreign => "foreign",
            DropReason::Disabled => "disabled",
            DropReason::Limit => "limit",
            DropReason::Loop => "loop",
            DropReason::NoArp => "no_arp",
            DropReason::Unsupported => "unsupported",
            DropReason::QueueFull => "queue_full",
            DropReason::Policy => "policy",
            DropReason::Spoofed => "spoofed",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NoRoute => "no_route",
        }
    }
}

/// Counters of one engine (the runtime sums those of its workers).
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Frames received from the segment.
    pub frames_in: u64,
    /// Bytes of those frames.
    pub bytes_in: u64,
    /// Frames emitted to the segment.
    pub frames_out: u64,
    /// Bytes of those frames.
    pub bytes_out: u64,
    /// Frames dropped, by reason (indexed by `DropReason as usize`).
    pub drops: [u64; DropReason::ALL.len()],
    /// Idle sessions ended to make room for new ones in a full table.
    pub evicted: u64,
    /// Of `frames_in`, the IPv6 ones.
    pub frames_in_ipv6: u64,
    /// Of `frames_out`, the IPv6 ones.
    pub frames_out_ipv6: u64,
    /// Frames of a worker's flows that another worker read from its TAP queue and handed over
    /// (multi-worker runtime: how well the TAP's queues follow the flows).
    pub handed_over: u64,
}

impl Stats {
    /// Counts one frame dropped for `why`.
    pub fn drop(&mut self, why: DropReason) {
        self.drops[why as usize] += 1;
    }

    /// Adds `other`'s counters to these (the runtime sums its workers' counters).
    pub fn merge(&mut self, other: &Stats) {
        self.frames_in += other.frames_in;
        self.bytes_in += other.bytes_in;
        self.frames_out += other.frames_out;
        self.bytes_out += other.bytes_out;
        self.evicted += other.evicted;
        self.frames_in_ipv6 += other.frames_in_ipv6;
        self.frames_out_ipv6 += other.frames_out_ipv6;
        self.handed_over += other.handed_over;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
    }

    /// Frames dropped for `why`.
    pub fn drops_of(&self, why: DropReason) -> u64 {
        self.drops[why as usize]
    }
}
