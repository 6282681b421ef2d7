//! `/metrics`: the Prometheus text format (0.0.4), made by the `prometheus`
//! crate. (`prometheus-client` writes OpenMetrics, whose counter families
//! `promtool check metrics` reads as untyped samples without help.)

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the controller exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Syncs by result.
    pub syncs: IntCounterVec,
    /// Sync duration by result.
    pub sync_seconds: HistogramVec,
    /// Phase durations (verify, compile, plan, apply).
    pub phase_seconds: HistogramVec,
    /// Drifted objects found by drift checks.
    pub drift_found: IntCounter,
    /// Drifted objects repaired.
    pub drift_repaired: IntCounter,
    /// Nodes by state (`ready`, `suspect`, `failed`, `fenced`, `maintenance`,
    /// `unreachable`; every state, 0 included).
    pub nodes: IntGaugeVec,
    /// 1 for each node's state (`node`, `state`).
    pub node_state: IntGaugeVec,
    /// The state `node_state` shows for each node: only what changed is written
    /// (10,000 label sets made again after every observation were a tenth of a
    /// sync's hand-over).
    pub node_state_shown:
        std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, &'static str>>>,
    /// Each HA VM's declared worst-case restart time after its node fails.
    pub ha_declared: GaugeVec,
    /// Each HA VM's last measured restart time (its node's last grant → running
    /// elsewhere with a heartbeat).
    pub ha_measured: GaugeVec,
    /// VMs by state (`running`, `crashed`, ..., `crash-looping`).
    pub vms: IntGaugeVec,
    /// Apply steps by result.
    pub steps: IntCounterVec,
    /// Commits refused by trust.
    pub commits_refused: IntCounter,
    /// Notifications by receiver and result (`sent`, `failed`, `dropped`).
    pub notifications: IntCounterVec,
    /// Fetches of a remote source by result (`updated`, `unchanged`, `failed`).
    pub fetches: IntCounterVec,
    /// Webhooks by result (`accepted`, `ignored`, `refused`).
    pub webhooks: IntCounterVec,
    /// 1 while paused.
    pub paused: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let paused = IntGauge::new(
            "cairn_controller_paused",
            "1 while the controller is paused (manual apply allowed, nothing applied automatically).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(paused.clone()))
            .expect("unique metric");
        Metrics {
            syncs: counter_vec(
                "cairn_controller_syncs_total",
                "Syncs of a commit, by result (succeeded, partial, failed, refused).",
                &["result"],
            ),
            sync_seconds: histogram_vec(
                "cairn_controller_sync_duration_seconds",
                "Duration of a sync of a commit, from its detection to its end, by result.",
                &["result"],
            ),
            phase_seconds: histogram_vec(
                "cairn_controller_sync_phase_duration_seconds",
                "Duration of each phase of a sync (verify, compile, plan, apply).",
                &["phase"],
            ),
            drift_found: counter(
                "cairn_controller_drift_found_total",
                "Objects found drifted from the applied commit by drift checks.",
            ),
            drift_repaired: counter(
                "cairn_controller_drift_repaired_total",
                "Drifted objects repaired by self-heal.",
            ),
            nodes: gauge_vec(
                "cairn_controller_nodes",
                "Nodes of the applied commit by state (ready, suspect, failed, fenced, maintenance, unreachable), from their leases and the last observation.",
                &["state"],
            ),
            node_state: gauge_vec(
                "cairn_controller_node_state",
                "1 for the state each node of the applied commit is in (ready, suspect, failed, fenced, maintenance, unreachable).",
                &["node", "state"],
            ),
            ha_declared: float_gauge_vec(
                "cairn_controller_ha_restart_declared_seconds",
                "Each HA VM's declared worst-case restart time after its node fails, from its site's timers (detect + margin + poll + restart estimate).",
                &["vm"],
            ),
            ha_measured: float_gauge_vec(
                "cairn_controller_ha_restart_measured_seconds",
                "Each HA VM's last measured restart time: from its failed node's last lease grant to the VM running elsewhere with a heartbeat.",
                &["vm"],
            ),
            vms: gauge_vec(
                "cairn_controller_vms",
                "VMs of the applied commit by state at the last observation.",
                &["state"],
            ),
            steps: counter_vec(
                "cairn_controller_apply_steps_total",
                "Apply steps carried out by the controller, by result.",
                &["result"],
            ),
            commits_refused: counter(
                "cairn_controller_commits_refused_total",
                "Commits refused because they were unsigned or signed by an untrusted key.",
            ),
            notifications: counter_vec(
                "cairn_controller_notifications_total",
                "Notifications to the receivers of notify.kdl, by receiver and result (sent, failed after every retry, dropped on a full queue).",
                &["receiver", "result"],
            ),
            fetches: counter_vec(
                "cairn_controller_fetches_total",
                "Fetches of the remote repository, by result (updated: the branch moved, unchanged, failed).",
                &["result"],
            ),
            webhooks: counter_vec(
                "cairn_controller_webhooks_total",
                "Webhooks received, by result (accepted: a push to the followed branch, ignored, refused: bad or missing signature).",
                &["result"],
            ),
            node_state_shown: Default::default(),
            paused,
            registry,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        String::from_utf8(out).expect("metrics are UTF-8")
    }

    /// Counts one notification to `receiver` by result.
    pub fn notification(&self, receiver: &str, result: &str) {
        self.notifications
            .with_label_values(&[receiver, result])
            .inc();
    }

    /// Replaces a gauge family's values.
    pub fn set_all(gauges: &IntGaugeVec, values: &std::collections::BTreeMap<String, i64>) {
        gauges.reset();
        for (label, value) in values {
            gauges.with_label_values(&[label.as_str()]).set(*value);
        }
    }
}
