//! The switch between a NIC and its clients: who receives a frame is the VMM's decision, never
//! the driver domain's (an untrusted domain must not choose who sees a frame).
//!
//! A pure data structure: no threads, no I/O. Each client has a static MAC (from the
//! configuration) and a [`ClientConfig`] (its RX mode and MAC tables, set by its driver through
//! the control queue). From the records the switch computes the NIC's [`FilterSet`] and says
//! when it changed (a CONFIG request is then owed to the domain).
//!
//! The rules, for a frame whose destination is `D`:
//! - **Unicast to a client's MAC** goes to that client only (if its mode accepts unicast),
//!   never to another, whatever their modes: promiscuity does not cross clients.
//! - **Other unicast** (from the NIC) goes to every client that is promiscuous, takes all
//!   unicast (ALLUNI or an overflowed table), or lists `D` in its unicast table.
//! - **Broadcast** goes to every client in promiscuous mode or not NOBCAST; **multicast** to
//!   every client in promiscuous mode, or not NOMULTI and ALLMULTI (or an overflowed table),
//!   or listing `D` in its multicast table.
//! - **From a client**: a frame shorter than an Ethernet header or longer than the largest
//!   frame is dropped; so is one whose source MAC is not the client's. Broadcast and multicast
//!   go to the NIC and, hairpinned, to every other client that accepts them. Unicast to
//!   another client's MAC, or to an address another client lists in its unicast table, goes to
//!   those clients only; other unicast goes to the NIC only (a client's promiscuous mode sees
//!   the wire's unknown unicast, not its neighbours' traffic). A frame to the sender's own
//!   MAC goes nowhere.
//!
//! Every drop is counted.

use std::collections::BTreeSet;

use ddvm_abi::channel::net::{filter_flags, FilterSet, MAC_LEN, MAX_FILTER_ADDRESSES};

/// A MAC address.
pub type Mac = [u8; MAC_LEN];

/// The broadcast address.
pub const BROADCAST: Mac = [0xff; MAC_LEN];
/// Length of an Ethernet header (destination, source, type).
pub const ETH_HEADER: usize = 14;
/// Entries of a client's unicast or multicast table (as QEMU's virtio-net); a driver that
/// sets more gets the table's overflow: every address of the kind.
pub const MAC_TABLE_ENTRIES: usize = 64;

/// Whether `mac` is a group (multicast or broadcast) address.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// A client's receive modes (virtio-net `VIRTIO_NET_CTRL_RX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxMode {
    /// Every frame the switch may give this client.
    pub promisc: bool,
    /// Every multicast frame.
    pub allmulti: bool,
    /// Every unicast frame not addressed to another client.
    pub alluni: bool,
    /// No multicast frame (unless promiscuous).
    pub nomulti: bool,
    /// No unicast frame (unless promiscuous).
    pub nouni: bool,
    /// No broadcast frame (unless promiscuous).
    pub nobcast: bool,
}

impl Default for RxMode {
    /// A driver that never configures its device (no control queue) gets its own unicast,
    /// broadcast and every multicast frame (it cannot name the groups it joins).
    fn default() -> Self {
        RxMode {
            promisc: false,
            allmulti: true,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
        }
    }
}

/// A MAC filter table: at most [`MAC_TABLE_ENTRIES`] addresses, or overflowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MacTable {
    /// The addresses (empty when overflowed).
    pub macs: Vec<Mac>,
    /// The driver set more than [`MAC_TABLE_ENTRIES`]: every address of the kind matches.
    pub overflow: bool,
}

impl MacTable {
    /// A table of `macs`; more than [`MAC_TABLE_ENTRIES`] overflow it.
    pub fn new(macs: Vec<Mac>) -> Self {
        if macs.len() > MAC_TABLE_ENTRIES {
            MacTable {
                macs: Vec::new(),
                overflow: true,
            }
        } else {
            MacTable {
                macs,
                overflow: false,
            }
        }
    }

    fn matches(&self, mac: &Mac) -> bool {
        self.overflow || self.macs.contains(mac)
    }
}

/// A client's configuration record: what its driver set through the control queue (the log
/// the VMM keeps and replays; a device reset returns it to the default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientConfig {
    /// Receive modes.
    pub rx: RxMode,
    /// Extra unicast addresses.
    pub unicast: MacTable,
    /// Multicast addresses.
    pub multicast: MacTable,
}

impl ClientConfig {
    fn accepts_broadcast(&self) -> bool {
        self.rx.promisc || !self.rx.nobcast
    }

    fn accepts_multicast(&self, dst: &Mac) -> bool {
        self.rx.promisc || (!self.rx.nomulti && (self.rx.allmulti || self.multicast.matches(dst)))
    }

    fn accepts_own_unicast(&self) -> bool {
        self.rx.promisc || !self.rx.nouni
    }

    /// Unicast to an address no client owns, from the wire.
    fn accepts_foreign_unicast(&self, dst: &Mac) -> bool {
        self.rx.promisc || (!self.rx.nouni && (self.rx.alluni || self.unicast.matches(dst)))
    }

    /// Unicast to an address no client owns, from another client: only an explicit claim.
    fn claims_unicast(&self, dst: &Mac) -> bool {
        !self.rx.nouni && self.unicast.macs.contains(dst)
    }

    fn wants_all_unicast(&self) -> bool {
        self.rx.promisc || (!self.rx.nouni && (self.rx.alluni || self.unicast.overflow))
    }

    fn wants_all_multicast(&self) -> bool {
        self.rx.promisc || (!self.rx.nomulti && (self.rx.allmulti || self.multicast.overflow))
    }
}

/// Index of a client in its switch.
pub type ClientId = usize;

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// Another client has this MAC.
    #[error("MAC {0:02x?} is already a client's")]
    Duplicate(Mac),
    /// A multicast, broadcast or all-zero address cannot be a client's.
    #[error("MAC {0:02x?} is not a unicast address")]
    NotUnicast(Mac),
}

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the largest frame.
    Oversized,
    /// Source MAC not the sending client's.
    Spoofed,
    /// No such client.
    NoClient,
}

/// Where a client's frame goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// Send it to the NIC.
    pub nic: bool,
    /// Hairpin a copy to these clients (never the sender).
    pub clients: Vec<ClientId>,
}

/// The switch's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchCounters {
    /// Frames dropped for being shorter than an Ethernet header (either way).
    pub runts: u64,
    /// Frames dropped for being longer than the largest frame (either way).
    pub oversized: u64,
    /// Client frames dropped for a source MAC not the client's.
    pub spoofed: u64,
    /// Frames from the NIC no client accepted.
    pub unwanted: u64,
    /// Client frames addressed to the sender itself.
    pub to_self: u64,
    /// Frames from clients hairpinned to at least one other client.
    pub hairpinned: u64,
}

struct Client {
    mac: Mac,
    config: ClientConfig,
}

/// The switch of one NIC.
pub struct Switch {
    clients: Vec<Client>,
    max_frame: usize,
    filters: FilterSet,
    /// Counters.
    pub counters: SwitchCounters,
}

impl Switch {
    /// A switch without clients for frames of at most `max_frame` bytes (no CRC).
    pub fn new(max_frame: usize) -> Self {
        let mut s = Switch {
            clients: Vec::new(),
            max_frame,
            filters: FilterSet::default(),
            counters: SwitchCounters::default(),
        };
        s.recompute();
        s
    }

    /// Largest frame accepted either way.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Sets the largest frame (from the NIC's device info).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Adds a client with static MAC `mac` and the default configuration. The filter set
    /// changes (a CONFIG is owed).
    pub fn add_client(&mut self, mac: Mac) -> Result<ClientId, SwitchError> {
        if is_group(&mac) || mac == [0; MAC_LEN] {
            return Err(SwitchError::NotUnicast(mac));
        }
        if self.clients.iter().any(|c| c.mac == mac) {
            return Err(SwitchError::Duplicate(mac));
        }
        self.clients.push(Client {
            mac,
            config: ClientConfig::default(),
        });
        self.recompute();
        Ok(self.clients.len() - 1)
    }

    /// Clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// No clients.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The static MAC of `client`.
    pub fn mac(&self, client: ClientId) -> Option<Mac> {
        self.clients.get(client).map(|c| c.mac)
    }

    /// The configuration record of `client`.
    pub fn config(&self, client: ClientId) -> Option<&ClientConfig> {
        self.clients.get(client).map(|c| &c.config)
    }

    /// Replaces the configuration record of `client`. True when the NIC's filter set changed
    /// (a CONFIG request with [`Switch::filters`] is then owed to the domain).
    pub fn set_config(&mut self, client: ClientId, config: ClientConfig) -> bool {
        let Some(c) = self.clients.get_mut(client) else {
            return false;
        };
        c.config = config;
        self.recompute()
    }

    /// The NIC's receive filters, as computed from every client.
    pub fn filters(&self) -> &FilterSet {
        &self.filters
    }

    /// Recomputes the filter set; true when it changed.
    fn recompute(&mut self) -> bool {
        let mut flags = 0;
        let mut unicast = BTreeSet::new();
        let mut multicast = BTreeSet::new();
        for c in &self.clients {
            unicast.insert(c.mac);
            if c.config.wants_all_unicast() {
                flags |= filter_flags::PROMISCUOUS;
            } else if !c.config.rx.nouni {
                unicast.extend(c.config.unicast.macs.iter().copied());
            }
            if c.config.wants_all_multicast() {
                flags |= filter_flags::ALL_MULTICAST;
            } else if !c.config.rx.nomulti {
                multicast.extend(c.config.multicast.macs.iter().copied());
            }
            if c.config.accepts_broadcast() {
                flags |= filter_flags::BROADCAST;
            }
        }
        // More addresses than a filter set carries: the NIC takes every address of the kind
        // and the switch drops what no client wants.
        if unicast.len() > MAX_FILTER_ADDRESSES {
            flags |= filter_flags::PROMISCUOUS;
        }
        if multicast.len() > MAX_FILTER_ADDRESSES {
            flags |= filter_flags::ALL_MULTICAST;
            multicast.clear();
        }
        if flags & filter_flags::ALL_MULTICAST != 0 {
            multicast.clear();
        }
        let mut set = FilterSet {
            flags,
            ..FilterSet::default()
        };
        for mac in unicast.into_iter().take(MAX_FILTER_ADDRESSES) {
            set.unicast.push(mac);
        }
        for mac in multicast {
            set.multicast.push(mac);
        }
        let changed = set != self.filters;
        self.filters = set;
        changed
    }

    fn owner(&self, mac: &Mac) -> Option<ClientId> {
        self.clients.iter().position(|c| &c.mac == mac)
    }

    fn size_ok(&mut self, len: usize) -> bool {
        if len < ETH_HEADER {
            self.counters.runts += 1;
            false
        } else if len > self.max_frame {
            self.counters.oversized += 1;
            false
        } else {
            true
        }
    }

    /// A frame from the NIC: the clients that receive it (in client order; empty when none
    /// does, or the frame is dropped).
    pub fn incoming(&mut self, frame: &[u8]) -> Vec<ClientId> {
        if !self.size_ok(frame.len()) {
            return Vec::new();
        }
        let dst = mac_at(frame, 0);
        let to = self.receivers(&dst, None, false);
        if to.is_empty() {
            self.counters.unwanted += 1;
        }
        to
    }

    /// A frame from `client`: where it goes, or why it is dropped.
    pub fn outgoing(&mut self, client: ClientId, frame: &[u8]) -> Result<Route, Dropped> {
        let Some(own) = self.mac(client) else {
            return Err(Dropped::NoClient);
        };
        if frame.len() < ETH_HEADER {
            self.counters.runts += 1;
            return Err(Dropped::Runt);
        }
        if frame.len() > self.max_frame {
            self.counters.oversized += 1;
            return Err(Dropped::Oversized);
        }
        if mac_at(frame, MAC_LEN) != own {
            self.counters.spoofed += 1;
            return Err(Dropped::Spoofed);
        }
        let dst = mac_at(frame, 0);
        let clients = self.receivers(&dst, Some(client), true);
        let nic = if is_group(&dst) {
            true
        } else if dst == own {
            self.counters.to_self += 1;
            false
        } else {
            // Unicast: to the wire unless a client owns or claims the address.
            self.owner(&dst).is_none() && clients.is_empty()
        };
        if !clients.is_empty() {
            self.counters.hairpinned += 1;
        }
        Ok(Route { nic, clients })
    }

    /// The clients other than `from` that receive a frame to `dst`; `local`: it comes from a
    /// client (unknown unicast then goes only to explicit claims).
    fn receivers(&self, dst: &Mac, from: Option<ClientId>, local: bool) -> Vec<ClientId> {
        let others = self
            .clients
            .iter()
            .enumerate()
            .filter(move |&(i, _)| Some(i) != from);
        if *dst == BROADCAST {
            return others
                .filter(|(_, c)| c.config.accepts_broadcast())
                .map(|(i, _)| i)
                .collect();
        }
        if is_group(dst) {
            return others
                .filter(|(_, c)| c.config.accepts_multicast(dst))
                .map(|(i, _)| i)
                .collect();
        }
        if let Some(owner) = self.owner(dst) {
            let c = &self.clients[owner];
            return if Some(owner) != from && c.config.accepts_own_unicast() {
                vec![owner]
            } else {
                Vec::new()
            };
        }
        others
            .filter(|(_, c)| {
                if local {
                    c.config.claims_unicast(dst)
                } else {
                    c.config.accepts_foreign_unicast(dst)
                }
            })
            .map(|(i, _)| i)
            .collect()
    }
}

fn mac_at(frame: &[u8], at: usize) -> Mac {
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(&frame[at..at + MAC_LEN]);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [2, 0, 0, 0, 0, 0xa];
    const B: Mac = [2, 0, 0, 0, 0, 0xb];
    const C: Mac = [2, 0, 0, 0, 0, 0xc];
    const EXT: Mac = [2, 0, 0, 0, 0, 0xee];
    const MCAST: Mac = [1, 0, 0x5e, 0, 0, 1];
    const MCAST2: Mac = [0x33, 0x33, 0, 0, 0, 1];

    fn frame(dst: Mac, src: Mac, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f
    }

    fn three() -> Switch {
        let mut s = Switch::new(1514);
        for mac in [A, B, C] {
            s.add_client(mac).unwrap();
        }
        s
    }

    fn with_rx(s: &mut Switch, id: ClientId, f: impl FnOnce(&mut RxMode)) -> bool {
        let mut cfg = s.config(id).unwrap().clone();
        f(&mut cfg.rx);
        s.set_config(id, cfg)
    }

    #[test]
    fn clients_need_distinct_unicast_macs() {
        let mut s = Switch::new(1514);
        assert_eq!(s.add_client(A), Ok(0));
        assert_eq!(s.add_client(A), Err(SwitchError::Duplicate(A)));
        assert_eq!(s.add_client(MCAST), Err(SwitchError::NotUnicast(MCAST)));
        assert_eq!(
            s.add_client(BROADCAST),
            Err(SwitchError::NotUnicast(BROADCAST))
        );
        assert_eq!(s.add_client([0; 6]), Err(SwitchError::NotUnicast([0; 6])));
        assert_eq!(s.add_client(B), Ok(1));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn unicast_from_the_nic_goes_to_its_owner_only_even_past_promiscuous_neighbours() {
        let mut s = three();
        with_rx(&mut s, 1, |m| m.promisc = true);
        with_rx(&mut s, 2, |m| m.alluni = true);
        assert_eq!(s.incoming(&frame(A, EXT, 60)), vec![0]);
        assert_eq!(s.incoming(&frame(B, EXT, 60)), vec![1]);
        // NOUNI: not even the owner (nobody else either).
        with_rx(&mut s, 0, |m| m.nouni = true);
        assert_eq!(s.incoming(&frame(A, EXT, 60)), Vec::<ClientId>::new());
        assert_eq!(s.counters.unwanted, 1);
        // Promiscuous overrides NOUNI.
        with_rx(&mut s, 0, |m| m.promisc = true);
        assert_eq!(s.incoming(&frame(A, EXT, 60)), vec![0]);
    }

    #[test]
    fn unknown_unicast_from_the_nic_goes_to_promiscuous_alluni_and_claiming_clients() {
        let mut s = three();
        assert!(s.incoming(&frame(EXT, B, 60)).is_empty());
        assert_eq!(s.counters.unwanted, 1);
        with_rx(&mut s, 0, |m| m.promisc = true);
        assert_eq!(s.incoming(&frame(EXT, B, 60)), vec![0]);
        with_rx(&mut s, 1, |m| m.alluni = true);
        assert_eq!(s.incoming(&frame(EXT, B, 60)), vec![0, 1]);
        let mut cfg = s.config(2).unwrap().clone();
        cfg.unicast = MacTable::new(vec![EXT]);
        s.set_config(2, cfg.clone());
        assert_eq!(s.incoming(&frame(EXT, B, 60)), vec![0, 1, 2]);
        // ALLUNI with NOUNI: nothing.
        with_rx(&mut s, 1, |m| m.nouni = true);
        assert_eq!(s.incoming(&frame(EXT, B, 60)), vec![0, 2]);
        // An overflowed table takes every unicast address.
        cfg.unicast = MacTable::new((0..65).map(|i| [2, 1, 0, 0, 0, i]).collect());
        assert!(cfg.unicast.overflow);
        s.set_config(2, cfg);
        assert_eq!(s.incoming(&frame([2, 9, 9, 9, 9, 9], B, 60)), vec![0, 2]);
    }

    #[test]
    fn broadcast_and_multicast_follow_each_clients_record() {
        let mut s = three();
        assert_eq!(s.incoming(&frame(BROADCAST, EXT, 60)), vec![0, 1, 2]);
        with_rx(&mut s, 1, |m| m.nobcast = true);
        assert_eq!(s.incoming(&frame(BROADCAST, EXT, 60)), vec![0, 2]);
        with_rx(&mut s, 1, |m| m.promisc = true);
        assert_eq!(s.incoming(&frame(BROADCAST, EXT, 60)), vec![0, 1, 2]);
        // Multicast: by default every client (all-multicast).
        assert_eq!(s.incoming(&frame(MCAST, EXT, 60)), vec![0, 1, 2]);
        with_rx(&mut s, 0, |m| m.allmulti = false);
        assert_eq!(s.incoming(&frame(MCAST, EXT, 60)), vec![1, 2]);
        let mut cfg = s.config(0).unwrap().clone();
        cfg.multicast = MacTable::new(vec![MCAST]);
        s.set_config(0, cfg);
        assert_eq!(s.incoming(&frame(MCAST, EXT, 60)), vec![0, 1, 2]);
        assert_eq!(s.incoming(&frame(MCAST2, EXT, 60)), vec![1, 2]);
        with_rx(&mut s, 2, |m| m.nomulti = true);
        assert_eq!(s.incoming(&frame(MCAST2, EXT, 60)), vec![1]);
        with_rx(&mut s, 0, |m| m.nomulti = true);
        assert_eq!(s.incoming(&frame(MCAST, EXT, 60)), vec![1]);
    }

    #[test]
    fn runts_and_oversized_frames_are_dropped_and_counted_both_ways() {
        let mut s = three();
        assert!(s.incoming(&[0xff; 13]).is_empty());
        assert_eq!(s.counters.runts, 1);
        assert_eq!(s.incoming(&frame(BROADCAST, EXT, 14)).len(), 3);
        assert_eq!(s.incoming(&frame(BROADCAST, EXT, 1514)).len(), 3);
        assert!(s.incoming(&frame(BROADCAST, EXT, 1515)).is_empty());
        assert_eq!(s.counters.oversized, 1);
        assert_eq!(
            s.outgoing(0, &frame(BROADCAST, A, 13)[..13]),
            Err(Dropped::Runt)
        );
        assert_eq!(
            s.outgoing(0, &frame(BROADCAST, A, 1515)),
            Err(Dropped::Oversized)
        );
        assert_eq!((s.counters.runts, s.counters.oversized), (2, 2));
        assert!(s.outgoing(0, &frame(BROADCAST, A, 1514)).is_ok());
        s.set_max_frame(1518);
        assert!(s.outgoing(0, &frame(BROADCAST, A, 1518)).is_ok());
        assert_eq!((s.counters.unwanted, s.counters.spoofed), (0, 0));
    }

    #[test]
    fn a_client_frame_with_a_foreign_source_mac_is_dropped() {
        let mut s = three();
        assert_eq!(s.outgoing(0, &frame(EXT, B, 60)), Err(Dropped::Spoofed));
        assert_eq!(
            s.outgoing(0, &frame(BROADCAST, EXT, 60)),
            Err(Dropped::Spoofed)
        );
        assert_eq!(s.counters.spoofed, 2);
        assert_eq!(s.outgoing(7, &frame(EXT, A, 60)), Err(Dropped::NoClient));
        assert_eq!(
            s.outgoing(0, &frame(EXT, A, 60)),
            Ok(Route {
                nic: true,
                clients: vec![]
            })
        );
    }

    #[test]
    fn client_to_client_unicast_is_hairpinned_and_never_reaches_the_nic() {
        let mut s = three();
        with_rx(&mut s, 2, |m| m.promisc = true);
        let r = s.outgoing(0, &frame(B, A, 60)).unwrap();
        assert_eq!(
            r,
            Route {
                nic: false,
                clients: vec![1]
            }
        );
        assert_eq!(s.counters.hairpinned, 1);
        // The owner refuses unicast: dropped, still not to the NIC.
        with_rx(&mut s, 1, |m| m.nouni = true);
        assert_eq!(s.outgoing(0, &frame(B, A, 60)).unwrap(), Route::default());
        // To itself: nowhere.
        assert_eq!(s.outgoing(0, &frame(A, A, 60)).unwrap(), Route::default());
        assert_eq!(s.counters.to_self, 1);
    }

    #[test]
    fn unknown_unicast_from_a_client_goes_to_the_nic_unless_a_neighbour_claims_it() {
        let mut s = three();
        with_rx(&mut s, 1, |m| m.promisc = true);
        with_rx(&mut s, 2, |m| m.alluni = true);
        // Promiscuous neighbours do not see a client's traffic to the wire.
        assert_eq!(
            s.outgoing(0, &frame(EXT, A, 60)).unwrap(),
            Route {
                nic: true,
                clients: vec![]
            }
        );
        let mut cfg = s.config(2).unwrap().clone();
        cfg.unicast = MacTable::new(vec![EXT]);
        s.set_config(2, cfg);
        assert_eq!(
            s.outgoing(0, &frame(EXT, A, 60)).unwrap(),
            Route {
                nic: false,
                clients: vec![2]
            }
        );
    }

    #[test]
    fn group_frames_from_a_client_go_to_the_nic_and_accepting_neighbours() {
        let mut s = three();
        with_rx(&mut s, 2, |m| m.nobcast = true);
        assert_eq!(
            s.outgoing(0, &frame(BROADCAST, A, 60)).unwrap(),
            Route {
                nic: true,
                clients: vec![1]
            }
        );
        with_rx(&mut s, 1, |m| m.allmulti = false);
        assert_eq!(
            s.outgoing(0, &frame(MCAST, A, 60)).unwrap(),
            Route {
                nic: true,
                clients: vec![2]
            }
        );
        // Never back to the sender, whatever its mode.
        with_rx(&mut s, 0, |m| m.promisc = true);
        assert_eq!(
            s.outgoing(0, &frame(MCAST, A, 60)).unwrap().clients,
            vec![2]
        );
    }

    #[test]
    fn the_filter_set_is_the_union_of_the_clients_and_changes_are_reported() {
        let mut s = Switch::new(1514);
        assert_eq!(s.filters().flags, 0);
        s.add_client(B).unwrap();
        s.add_client(A).unwrap();
        let f = s.filters().clone();
        assert_eq!(f.unicast.as_slice(), &[A, B]);
        assert_eq!(
            f.flags,
            filter_flags::BROADCAST | filter_flags::ALL_MULTICAST,
            "defaults: broadcast and every multicast"
        );
        assert!(f.multicast.is_empty());
        // Both leave all-multicast for tables: the union of their tables.
        let mut cfg = ClientConfig::default();
        cfg.rx.allmulti = false;
        cfg.multicast = MacTable::new(vec![MCAST]);
        // The other still takes every multicast frame: the NIC's filters stay as they were.
        assert!(!s.set_config(0, cfg.clone()));
        assert_ne!(s.filters().flags & filter_flags::ALL_MULTICAST, 0);
        cfg.multicast = MacTable::new(vec![MCAST2, MCAST]);
        assert!(s.set_config(1, cfg.clone()));
        assert_eq!(s.filters().flags, filter_flags::BROADCAST);
        assert_eq!(s.filters().multicast.as_slice(), &[MCAST, MCAST2]);
        // The same record again: no change, no CONFIG.
        assert!(!s.set_config(1, cfg.clone()));
        // Extra unicast addresses join the clients' MACs.
        let mut u = cfg.clone();
        u.unicast = MacTable::new(vec![EXT]);
        assert!(s.set_config(1, u));
        assert_eq!(s.filters().unicast.as_slice(), &[A, B, EXT]);
        // Promiscuous, all-unicast or an overflowed table anywhere: PROMISCUOUS.
        let opens: [fn(&mut ClientConfig); 3] = [
            |c: &mut ClientConfig| c.rx.promisc = true,
            |c: &mut ClientConfig| c.rx.alluni = true,
            |c: &mut ClientConfig| c.unicast = MacTable::new(vec![EXT; 65]),
        ];
        for f in opens {
            let mut p = cfg.clone();
            f(&mut p);
            assert!(s.set_config(0, p));
            assert_ne!(s.filters().flags & filter_flags::PROMISCUOUS, 0);
            assert!(s.set_config(0, cfg.clone()));
            assert_eq!(s.filters().flags & filter_flags::PROMISCUOUS, 0);
        }
        // Nobody takes broadcast: no BROADCAST.
        let mut nb = cfg.clone();
        nb.rx.nobcast = true;
        s.set_config(0, nb.clone());
        assert_ne!(s.filters().flags & filter_flags::BROADCAST, 0);
        assert!(s.set_config(1, nb));
        assert_eq!(s.filters().flags & filter_flags::BROADCAST, 0);
        // NOMULTI leaves a client's table out.
        let mut nm = cfg.clone();
        nm.rx.nomulti = true;
        s.set_config(0, nm.clone());
        s.set_config(1, nm);
        assert!(s.filters().multicast.is_empty());
        assert_eq!(s.filters().flags & filter_flags::ALL_MULTICAST, 0);
    }

    #[test]
    fn more_addresses_than_a_filter_set_carries_open_the_filter() {
        let mut s = Switch::new(1514);
        let mut cfg = ClientConfig::default();
        cfg.rx.allmulti = false;
        for client in 0..2u8 {
            s.add_client([2, 0, 0, 0, 1, client]).unwrap();
            cfg.multicast = MacTable::new((0..40).map(|i| [1, 0, 0x5e, 0, client, i]).collect());
            cfg.unicast = MacTable::new((0..40).map(|i| [2, 0, 0, 2, client, i]).collect());
            s.set_config(client as usize, cfg.clone());
        }
        let f = s.filters();
        assert_ne!(f.flags & filter_flags::ALL_MULTICAST, 0);
        assert!(f.multicast.is_empty());
        assert_ne!(f.flags & filter_flags::PROMISCUOUS, 0);
        assert_eq!(f.unicast.len(), MAX_FILTER_ADDRESSES);
        // It still encodes.
        let mut buf = [0u8; ddvm_abi::channel::net::MAX_FILTER_SET_LEN];
        let n = f.encode(&mut buf);
        assert_eq!(FilterSet::decode(&buf[..n]).as_ref(), Ok(f));
    }
}
