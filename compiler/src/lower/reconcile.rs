//! Lowering of the `reconcile` block (the repository's own sync policy).
//! Values are typed here; the freeze windows' times, and the rule of one
//! block per repository, are checked by `check::reconcile`.

use kdl::KdlNode;

use super::Cx;
use crate::spec::{FreezeSpec, ReconcileSpec};

impl Cx<'_> {
    pub(super) fn reconcile(&mut self, node: &KdlNode) -> ReconcileSpec {
        let mut r = ReconcileSpec {
            span: self.sp(node.name().span()),
            auto_apply: None,
            self_heal: None,
            prune: None,
            drift_check: None,
            crash_restart: None,
            blast_radius: None,
            freezes: vec![],
        };
        for c in self.children(node.children(), "reconcile", "the `reconcile` block") {
            let n = c.node;
            match c.name {
                "auto-apply" | "self-heal" | "prune" => {
                    let what = format!("`{}`", c.name);
                    let v = self.single_value(n).and_then(|e| self.bool(e, &what));
                    let slot = match c.name {
                        "auto-apply" => &mut r.auto_apply,
                        "self-heal" => &mut r.self_heal,
                        _ => &mut r.prune,
                    };
                    let first = slot.as_ref().map(|s| s.span);
                    self.once(slot, v, n, first);
                }
                "drift-check" => {
                    let v = self.required(n, "every", "\"30s\"").and_then(|e| {
                        self.duration_within(e, "the drift-check interval", 1_000, 86_400_000)
                    });
                    let first = r.drift_check.as_ref().map(|s| s.span);
                    self.once(&mut r.drift_check, v, n, first);
                }
                "crash-restart" => {
                    let limit = self
                        .required(n, "limit", "3")
                        .and_then(|e| self.u32(e, "the crash-restart limit", 1, 1_000));
                    let window = self.required(n, "window", "\"10m\"").and_then(|e| {
                        self.duration_within(e, "the crash-restart window", 10_000, 86_400_000)
                    });
                    let v = limit.zip(window);
                    let first = r.crash_restart.as_ref().map(|s| s.0.span);
                    self.once(&mut r.crash_restart, v, n, first);
                }
                "blast-radius" => {
                    let v = self
                        .required(n, "max", "10")
                        .and_then(|e| self.u32(e, "the blast-radius budget", 0, 1_000_000));
                    let first = r.blast_radius.as_ref().map(|s| s.span);
                    self.once(&mut r.blast_radius, v, n, first);
                }
                "freeze" => {
                    let Some(name) = self.name(n) else {
                        continue;
                    };
                    let from = self
                        .required(n, "from", "\"Fri 18:00\"")
                        .and_then(|e| self.string(e, "the start of the freeze window"));
                    let to = self
                        .required(n, "to", "\"Mon 06:00\"")
                        .and_then(|e| self.string(e, "the end of the freeze window"));
                    let zone = self
                        .prop(n, "zone")
                        .and_then(|e| self.string(e, "the freeze window's UTC offset"));
                    r.freezes.push(FreezeSpec {
                        name,
                        from,
                        to,
                        zone,
                    });
                }
                _ => {}
            }
        }
        r
    }
}
