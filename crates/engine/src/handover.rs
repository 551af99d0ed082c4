//! When an exit node's host can hand its role over without cutting a connection in half.
//!
//! The connections that members make through an exit node leave it masqueraded behind
//! the host's public address, and that NAT state stays with the host; connections to
//! the host itself (its DNS over PeerAPI) end at its sockets. When a standby host takes
//! over, a connection that was in the middle of an exchange cannot go on (the far end
//! sees another address, the new host knows no such socket), so an HTTP request in
//! flight at that instant fails. For a *planned* switch the host that gives the role up
//! waits, for a bounded time, for a moment when no such TCP connection is in progress
//! and no packet went either way for a short while ([`ExitFlows::quiet`]), and stands by
//! then. Connections that never pause (a long download, a chatty session) are cut when
//! the wait runs out, as they would be without it.
//!
//! [`ExitFlows`] is pure logic: packets and `now` in, a verdict out. The device of an
//! exit node feeds it every packet from and to its peers, in both directions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::filter::{TCP, parse};

/// No packet of a member's for this long (besides connections that have ended): a request
/// that is about to start is not yet on its way.
pub const QUIET_GAP: Duration = Duration::from_millis(20);

/// A TCP connection that has not ended counts as in progress while its last packet is
/// younger than this (one that has been idle longer is a kept-alive connection, which a
/// wait would not save).
pub const IN_PROGRESS: Duration = Duration::from_secs(1);

/// Most connections tracked. A new one beyond that makes the host count as busy for
/// [`IN_PROGRESS`] (it cannot vouch for what it does not track).
pub const MAX_TRACKED: usize = 4096;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// A member's TCP connection, keyed by (member address, port, far address, port).
type Key = (IpAddr, u16, IpAddr, u16);

#[derive(Debug, Clone, Copy)]
struct Conn {
    last: Instant,
    fin_out: bool,
    fin_in: bool,
}

impl Conn {
    /// Both sides closed: kept a while, so that the last ACK does not open it again.
    fn closed(&self) -> bool {
        self.fin_out && self.fin_in
    }
}

/// What [`ExitFlows::quiet`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// TCP connections in progress.
    pub in_progress: usize,
    /// A packet of a member's within [`QUIET_GAP`] (or a connection untracked for want of
    /// room within [`IN_PROGRESS`]).
    pub recent: bool,
}

/// The TCP connections and last packet of members through and to an exit node (see
/// the module docs).
#[derive(Debug, Default)]
pub struct ExitFlows {
    conns: HashMap<Key, Conn>,
    last_packet: Option<Instant>,
    untracked: Option<Instant>,
    /// Connections seen since tracking began.
    seen: u64,
}

impl ExitFlows {
    /// A packet of a member's: `outbound` from the member (as it came out of the
    /// tunnel), otherwise to it.
    pub fn note(&mut self, packet: &[u8], outbound: bool, now: Instant) {
        self.last_packet = Some(now);
        let Some(h) = parse(packet) else { return };
        let (TCP, Some((sport, dport))) = (h.proto, h.ports) else {
            return;
        };
        let key = if outbound {
            (h.src, sport, h.dst, dport)
        } else {
            (h.dst, dport, h.src, sport)
        };
        let flags = h.tcp_flags;
        if flags & RST != 0 {
            self.conns.remove(&key);
            return;
        }
        let conn = match self.conns.get_mut(&key) {
            Some(c) => c,
            None => {
                if self.conns.len() >= MAX_TRACKED {
                    self.conns
                        .retain(|_, c| !c.closed() && now.duration_since(c.last) < IN_PROGRESS);
                }
                if self.conns.len() >= MAX_TRACKED {
                    self.untracked = Some(now);
                    return;
                }
                // A SYN opens one; any other packet of a connection we did not see open
                // (older than the tracking, or its SYN went elsewhere) counts as well.
                self.seen += 1;
                self.conns.entry(key).or_insert(Conn {
                    last: now,
                    fin_out: false,
                    fin_in: false,
                })
            }
        };
        if flags & SYN != 0 && (conn.fin_out || conn.fin_in) {
            // The same ports again: a new connection.
            conn.fin_out = false;
            conn.fin_in = false;
        } else if conn.closed() {
            // The last ACK (or a retransmitted FIN) of a connection that has ended.
            return;
        }
        conn.last = now;
        if flags & FIN != 0 {
            if outbound {
                conn.fin_out = true;
            } else {
                conn.fin_in = true;
            }
        }
    }

    /// `None` when the host may stand by now without cutting an exchange in half;
    /// otherwise what keeps it busy. Forgets connections idle beyond [`IN_PROGRESS`].
    pub fn quiet(&mut self, now: Instant) -> Option<Busy> {
        self.conns
            .retain(|_, c| now.duration_since(c.last) < IN_PROGRESS);
        let in_progress = self.conns.values().filter(|c| !c.closed()).count();
        let recent = self
            .last_packet
            .is_some_and(|t| now.duration_since(t) < QUIET_GAP)
            || self
                .untracked
                .is_some_and(|t| now.duration_since(t) < IN_PROGRESS);
        (recent || in_progress > 0).then_some(Busy {
            in_progress,
            recent,
        })
    }

    /// TCP connections seen since tracking began (for logs).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// TCP connections that have not ended (in progress, or idle not long ago).
    pub fn tracked(&self) -> usize {
        self.conns.values().filter(|c| !c.closed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMBER: [u8; 4] = [100, 64, 0, 2];
    const WEB: [u8; 4] = [203, 0, 113, 10];
    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;

    /// An IPv4 TCP header pair, `src:sport -> dst:dport` with `flags`.
    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = TCP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 0x50;
        p[33] = flags;
        p
    }

    fn out(f: &mut ExitFlows, flags: u8, now: Instant) {
        f.note(&tcp(MEMBER, 40000, WEB, 80, flags), true, now);
    }

    fn back(f: &mut ExitFlows, flags: u8, now: Instant) {
        f.note(&tcp(WEB, 80, MEMBER, 40000, flags), false, now);
    }

    fn ms(t: Instant, n: u64) -> Instant {
        t + Duration::from_millis(n)
    }

    #[test]
    fn a_request_is_in_progress_from_its_syn_until_both_sides_closed() {
        let t = Instant::now();
        let mut f = ExitFlows::default();
        assert_eq!(f.quiet(t), None, "nothing forwarded yet");
        out(&mut f, SYN, t);
        back(&mut f, SYN | ACK, ms(t, 1));
        out(&mut f, ACK | PSH, ms(t, 2));
        assert_eq!(f.seen(), 1);
        // The server thinks for a while: still in progress, though nothing moves.
        let busy = f.quiet(ms(t, 500)).expect("a request in flight");
        assert_eq!(
            busy,
            Busy {
                in_progress: 1,
                recent: false
            }
        );
        back(&mut f, ACK | PSH | FIN, ms(t, 600));
        assert_eq!(
            f.quiet(ms(t, 700)).map(|b| b.in_progress),
            Some(1),
            "half closed"
        );
        out(&mut f, ACK | FIN, ms(t, 701));
        assert_eq!(f.tracked(), 0, "both sides closed");
        // The server's last ACK does not open it again.
        back(&mut f, ACK, ms(t, 702));
        assert_eq!(f.tracked(), 0, "the last ACK");
        assert!(f.quiet(ms(t, 710)).is_some(), "within the quiet gap");
        assert_eq!(f.quiet(ms(t, 702 + 20)), None, "quiet");
    }

    #[test]
    fn a_reset_ends_a_connection_and_an_idle_one_stops_counting() {
        let t = Instant::now();
        let mut f = ExitFlows::default();
        out(&mut f, SYN, t);
        back(&mut f, RST | ACK, ms(t, 1));
        assert_eq!(f.quiet(ms(t, 30)), None);
        // A kept-alive connection that has been idle for a second no longer holds the
        // handover up.
        out(&mut f, ACK | PSH, ms(t, 100));
        assert!(f.quiet(ms(t, 1099)).is_some());
        assert_eq!(f.quiet(ms(t, 1100)), None);
        assert_eq!(f.tracked(), 0);
    }

    #[test]
    fn a_connection_seen_mid_stream_counts_and_the_same_ports_reopen() {
        let t = Instant::now();
        let mut f = ExitFlows::default();
        // Data of a connection opened before tracking began (in either direction).
        back(&mut f, ACK | PSH, t);
        assert_eq!(f.quiet(ms(t, 50)).map(|b| b.in_progress), Some(1));
        out(&mut f, FIN | ACK, ms(t, 60));
        back(&mut f, FIN | ACK, ms(t, 61));
        assert_eq!(f.tracked(), 0);
        // A FIN from one side, then the ports are used again by a new connection: its
        // own FINs are needed to close it.
        out(&mut f, FIN | ACK, ms(t, 100));
        out(&mut f, SYN, ms(t, 110));
        back(&mut f, FIN | ACK, ms(t, 120));
        assert_eq!(f.tracked(), 1, "the new connection is still open");
    }

    #[test]
    fn udp_and_other_traffic_only_need_the_quiet_gap() {
        let t = Instant::now();
        let mut f = ExitFlows::default();
        let mut dns = tcp(MEMBER, 40000, WEB, 53, 0);
        dns[9] = 17;
        f.note(&dns, true, t);
        f.note(b"not a packet", false, ms(t, 5));
        assert_eq!(
            f.quiet(ms(t, 10)),
            Some(Busy {
                in_progress: 0,
                recent: true
            })
        );
        assert_eq!(f.quiet(ms(t, 25)), None);
    }

    #[test]
    fn connections_beyond_the_bound_make_the_host_busy_instead_of_growing() {
        let t = Instant::now();
        let mut f = ExitFlows::default();
        for i in 0..MAX_TRACKED {
            let port = 1024 + u16::try_from(i).unwrap();
            f.note(&tcp(MEMBER, port, WEB, 80, SYN), true, t);
        }
        assert_eq!(f.tracked(), MAX_TRACKED);
        f.note(&tcp(MEMBER, 9, WEB, 80, SYN), true, ms(t, 10));
        assert_eq!(f.tracked(), MAX_TRACKED, "bounded");
        // The tracked ones age out; the untracked one still counts for its second.
        assert!(
            f.quiet(ms(t, 1005))
                .is_some_and(|b| b.recent && b.in_progress == 0)
        );
        assert_eq!(f.quiet(ms(t, 1010)), None);
        // Room again once the old ones aged out.
        f.note(&tcp(MEMBER, 9, WEB, 80, SYN), true, ms(t, 1100));
        assert_eq!(f.tracked(), 1);
    }
}
