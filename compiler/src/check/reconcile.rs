//! The `reconcile` block: at most one per repository, freeze windows with
//! unique names and times that parse (see `model::reconcile` for the forms).

use super::{Checker, unique};
use crate::diag::Diagnostic;
use crate::model::{FreezeSchedule, FreezeTime, FreezeWindow, Reconcile, parse_utc_offset};
use crate::spec::{ReconcileSpec, Spanned, SpecSet};

impl Checker<'_> {
    pub(super) fn reconcile(&mut self, set: &SpecSet) -> Option<Reconcile> {
        let (first, rest) = set.reconcile.split_first()?;
        for again in rest {
            self.push(
                Diagnostic::error(
                    "cairn::resolve::duplicate_reconcile",
                    again.span,
                    "the `reconcile` block is given twice",
                )
                .with_label("given again here")
                .and_label(first.span, "first given here")
                .with_help(
                    "a repository has one sync policy: keep one `reconcile` block and move its settings there",
                ),
            );
        }
        Some(self.reconcile_block(first))
    }

    fn reconcile_block(&mut self, spec: &ReconcileSpec) -> Reconcile {
        let defaults = Reconcile::default();
        unique(
            self.diags,
            "freeze window",
            " in the `reconcile` block",
            spec.freezes.iter().map(|f| &f.name),
        );
        let mut freezes = vec![];
        for f in &spec.freezes {
            let offset = match &f.zone {
                None => Some(0),
                Some(z) => self.freeze_value(z, parse_utc_offset(&z.value)),
            };
            let from = f
                .from
                .as_ref()
                .and_then(|t| self.freeze_value(t, FreezeTime::parse(&t.value)));
            let to =
                f.to.as_ref()
                    .and_then(|t| self.freeze_value(t, FreezeTime::parse(&t.value)));
            let (Some(offset), Some(from_t), Some(to_t), Some(from), Some(to)) =
                (offset, from, to, &f.from, &f.to)
            else {
                continue;
            };
            match FreezeSchedule::new(from_t, to_t) {
                Ok(schedule) => freezes.push(FreezeWindow {
                    name: f.name.value.clone(),
                    from: from.value.clone(),
                    to: to.value.clone(),
                    offset_minutes: offset,
                    schedule,
                }),
                Err(why) => self.push(
                    Diagnostic::error(
                        "cairn::schema::invalid_value",
                        to.span,
                        format!("freeze window `{}`: {why}", f.name.value),
                    )
                    .with_label("ends here")
                    .and_label(from.span, "starts here")
                    .with_help(
                        "a window is `from` (included) to `to` (excluded): e.g. `freeze \"weekend\" from=\"Fri 18:00\" to=\"Mon 06:00\"`",
                    ),
                ),
            }
        }
        freezes.sort_by(|a, b| a.name.cmp(&b.name));
        freezes.dedup_by(|a, b| a.name == b.name);
        Reconcile {
            auto_apply: spec
                .auto_apply
                .as_ref()
                .map_or(defaults.auto_apply, |v| v.value),
            self_heal: spec
                .self_heal
                .as_ref()
                .map_or(defaults.self_heal, |v| v.value),
            prune: spec.prune.as_ref().map_or(defaults.prune, |v| v.value),
            drift_check_ms: spec.drift_check.as_ref().map(|v| v.value),
            blast_radius: spec.blast_radius.as_ref().map(|v| v.value),
            freezes,
            crash_restart_limit: spec
                .crash_restart
                .as_ref()
                .map_or(defaults.crash_restart_limit, |(l, _)| l.value),
            crash_restart_window_ms: spec
                .crash_restart
                .as_ref()
                .map_or(defaults.crash_restart_window_ms, |(_, w)| w.value),
        }
    }

    fn freeze_value<T>(
        &mut self,
        written: &Spanned<String>,
        parsed: Result<T, String>,
    ) -> Option<T> {
        match parsed {
            Ok(v) => Some(v),
            Err(why) => {
                self.push(
                    Diagnostic::error("cairn::schema::invalid_value", written.span, why)
                        .with_label("here")
                        .with_help(
                            "times are in a fixed UTC offset (`zone=\"+01:00\"`, default UTC): \"22:00\", \"Fri 18:00\" or \"2026-12-24 00:00\"",
                        ),
                );
                None
            }
        }
    }
}
