//! The fallback's failover monitor: watches link events in the node's
//! namespace and keeps the live member attached to the bond's bridge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::NetworkError;
use crate::announce::announce;
use crate::bond::converge_fallback_ports;
use crate::netns::NetNs;
use crate::nl::Rtnl;
use crate::spec::BondSpec;

/// One member swap done by the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverEvent {
    /// Milliseconds since the monitor started.
    pub at_ms: u64,
    /// What was changed (detach/attach steps).
    pub actions: Vec<String>,
}

/// A running failover monitor for one fallback bond. Stops on drop.
#[derive(Debug)]
pub struct FailoverMonitor {
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<FailoverEvent>>>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl FailoverMonitor {
    /// Starts watching `spec`'s members in `ns`. Link events wake it at once;
    /// `spec.miimon` is the poll interval in case an event is missed.
    pub fn start(ns: &NetNs, spec: &BondSpec) -> Result<Self, NetworkError> {
        let interval = Duration::from_millis(u64::from(spec.miimon.max(1)));
        let mut events_sock =
            Rtnl::open_link_monitor(ns, interval).map_err(|e| NetworkError::netlink(ns, e))?;
        let mut rtnl = Rtnl::open(ns).map_err(|e| NetworkError::netlink(ns, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let spec = spec.clone();
        let ns = ns.clone();
        let (stop2, events2, errors2) = (stop.clone(), events.clone(), errors.clone());
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name(format!("failover-{}", spec.name))
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    if let Err(e) = events_sock.wait_link_events() {
                        errors2.lock().expect("errors lock").push(e.to_string());
                        std::thread::sleep(interval);
                    }
                    match converge_fallback_ports(&mut rtnl, &spec) {
                        Ok(mut actions) if !actions.is_empty() => {
                            match announce(&ns, &mut rtnl, &spec.name) {
                                Ok((arps, nas)) => actions.push(format!(
                                    "sent {arps} gratuitous arp(s) and {nas} unsolicited neighbor advertisement(s) on {}",
                                    spec.name
                                )),
                                Err(e) => errors2.lock().expect("errors lock").push(e.to_string()),
                            }
                            events2.lock().expect("events lock").push(FailoverEvent {
                                at_ms: started.elapsed().as_millis() as u64,
                                actions,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => errors2.lock().expect("errors lock").push(e.to_string()),
                    }
                }
            })
            .map_err(|e| NetworkError::Monitor(e.to_string()))?;
        Ok(Self {
            stop,
            events,
            errors,
            thread: Some(thread),
            started,
        })
    }

    /// When the monitor started ([`FailoverEvent::at_ms`] counts from here).
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Swaps done so far.
    pub fn events(&self) -> Vec<FailoverEvent> {
        self.events.lock().expect("events lock").clone()
    }

    /// Errors met so far (the monitor keeps running after an error).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }

    /// Stops the monitor and waits for its thread (at most one miimon).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FailoverMonitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}
