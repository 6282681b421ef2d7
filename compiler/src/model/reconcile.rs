//! The `reconcile` block in the model: the repository's own sync policy, as
//! the controller reads it (from the commit applied last, so a commit cannot
//! loosen its own gate), and the freeze windows' arithmetic.
//!
//! Freeze times are deterministic: minutes in a fixed UTC offset (`zone`,
//! default `+00:00`), no time-zone database and no daylight saving. Three
//! forms, the same for `from` and `to`:
//!
//! - `"HH:MM"`: every day (`from="22:00" to="06:00"` crosses midnight);
//! - `"Ddd HH:MM"` (`Mon` … `Sun`): every week (`from="Fri 18:00" to="Mon 06:00"`);
//! - `"YYYY-MM-DD HH:MM"`: once.
//!
//! A window contains `from` and excludes `to`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The repository's sync policy (`reconcile { … }`); defaults when absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reconcile {
    /// Carry out a commit's plan without approval (`auto-apply`, default on);
    /// off: every plan is held for `cairn sync --approve PLAN_ID`.
    pub auto_apply: bool,
    /// Repair drift between commits (`self-heal`, default on); off: reported.
    pub self_heal: bool,
    /// Delete objects removed from the specs (`prune`, default on, as
    /// `cairn apply` does); off: they are reported and left alone.
    pub prune: bool,
    /// `drift-check every=` in ms; absent: the controller's `--drift-interval`.
    pub drift_check_ms: Option<u64>,
    /// `blast-radius max=`: a plan that deletes, replaces, preempts or moves
    /// more objects is held for approval even with `auto-apply` on.
    pub blast_radius: Option<u32>,
    /// Freeze windows: nothing is applied automatically inside one.
    pub freezes: Vec<FreezeWindow>,
    /// `crash-restart limit=`: a VM that crashed this many times within the
    /// window is restarted on another node instead of in place (default 3).
    #[serde(default = "default_crash_restart_limit")]
    pub crash_restart_limit: u32,
    /// `crash-restart window=` in ms (default 10 minutes).
    #[serde(default = "default_crash_restart_window_ms")]
    pub crash_restart_window_ms: u64,
}

/// `crash-restart limit=` when the block does not say.
pub const DEFAULT_CRASH_RESTART_LIMIT: u32 = 3;
/// `crash-restart window=` when the block does not say (10 minutes).
pub const DEFAULT_CRASH_RESTART_WINDOW_MS: u64 = 600_000;

fn default_crash_restart_limit() -> u32 {
    DEFAULT_CRASH_RESTART_LIMIT
}

fn default_crash_restart_window_ms() -> u64 {
    DEFAULT_CRASH_RESTART_WINDOW_MS
}

impl Default for Reconcile {
    fn default() -> Self {
        Reconcile {
            auto_apply: true,
            self_heal: true,
            prune: true,
            drift_check_ms: None,
            blast_radius: None,
            freezes: vec![],
            crash_restart_limit: DEFAULT_CRASH_RESTART_LIMIT,
            crash_restart_window_ms: DEFAULT_CRASH_RESTART_WINDOW_MS,
        }
    }
}

/// One freeze window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeWindow {
    /// Name.
    pub name: String,
    /// Start, as written.
    pub from: String,
    /// End, as written.
    pub to: String,
    /// The UTC offset the times are in, in minutes east of UTC.
    pub offset_minutes: i32,
    /// When it repeats, in minutes.
    pub schedule: FreezeSchedule,
}

/// A freeze window's times, in minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "repeat", rename_all = "snake_case")]
pub enum FreezeSchedule {
    /// Every day: minutes after local midnight.
    Daily {
        /// Start.
        from_minute: u32,
        /// End (before `from_minute`: the window crosses midnight).
        to_minute: u32,
    },
    /// Every week: minutes after local Monday 00:00.
    Weekly {
        /// Start.
        from_minute: u32,
        /// End (before `from_minute`: the window crosses Monday 00:00).
        to_minute: u32,
    },
    /// Once: minutes since 1970-01-01 00:00 local time.
    Once {
        /// Start.
        from_minute: i64,
        /// End (after the start).
        to_minute: i64,
    },
}

const DAY: i64 = 24 * 60;
const WEEK: i64 = 7 * DAY;
const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One freeze time, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeTime {
    /// `HH:MM`.
    Daily(u32),
    /// `Ddd HH:MM` (minutes after Monday 00:00).
    Weekly(u32),
    /// `YYYY-MM-DD HH:MM` (minutes since the epoch, local).
    Once(i64),
}

fn hh_mm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl FreezeTime {
    /// Parses one of the three forms; `Err` says what is accepted.
    pub fn parse(s: &str) -> Result<FreezeTime, String> {
        const FORMS: &str = "write \"HH:MM\" (daily), \"Ddd HH:MM\" with Ddd one of Mon, Tue, Wed, Thu, Fri, Sat, Sun (weekly) or \"YYYY-MM-DD HH:MM\" (once), in 24-hour time";
        let s = s.trim();
        let bad = || Err(format!("`{s}` is not a freeze time: {FORMS}"));
        match s.split_once(' ') {
            None => hh_mm(s)
                .map(FreezeTime::Daily)
                .ok_or(())
                .or_else(|()| bad()),
            Some((day, time)) => {
                let Some(minute) = hh_mm(time.trim()) else {
                    return bad();
                };
                if let Some(i) = WEEKDAYS.iter().position(|d| d.eq_ignore_ascii_case(day)) {
                    return Ok(FreezeTime::Weekly(i as u32 * DAY as u32 + minute));
                }
                let parts: Vec<&str> = day.split('-').collect();
                let [y, m, d] = parts[..] else {
                    return bad();
                };
                let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i64>(), m.parse::<i64>(), d.parse::<i64>())
                else {
                    return bad();
                };
                let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
                let month_days = [
                    31,
                    if leap { 29 } else { 28 },
                    31,
                    30,
                    31,
                    30,
                    31,
                    31,
                    30,
                    31,
                    30,
                    31,
                ];
                if !(1970..=9999).contains(&y)
                    || !(1..=12).contains(&m)
                    || d < 1
                    || d > month_days[(m - 1) as usize]
                {
                    return Err(format!(
                        "`{s}` is not a calendar date (from 1970-01-01 to 9999-12-31)"
                    ));
                }
                Ok(FreezeTime::Once(
                    days_from_civil(y, m, d) * DAY + i64::from(minute),
                ))
            }
        }
    }
}

/// Parses a UTC offset `+HH:MM` / `-HH:MM` (or `UTC`, `Z`) to minutes east of UTC.
pub fn parse_utc_offset(s: &str) -> Result<i32, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Ok(0);
    }
    let bad = || {
        format!(
            "`{s}` is not a UTC offset: write \"+HH:MM\" or \"-HH:MM\" (e.g. \"+01:00\"), or \"UTC\"; time zones with daylight saving are not used, so the window never shifts"
        )
    };
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let m = hh_mm(rest).ok_or_else(bad)?;
    if m > 14 * 60 {
        return Err(bad());
    }
    Ok(sign * m as i32)
}

impl FreezeSchedule {
    /// The schedule of two times of the same form; `Err` says what is wrong.
    pub fn new(from: FreezeTime, to: FreezeTime) -> Result<FreezeSchedule, String> {
        match (from, to) {
            (FreezeTime::Daily(a), FreezeTime::Daily(b)) if a != b => Ok(FreezeSchedule::Daily {
                from_minute: a,
                to_minute: b,
            }),
            (FreezeTime::Weekly(a), FreezeTime::Weekly(b)) if a != b => {
                Ok(FreezeSchedule::Weekly {
                    from_minute: a,
                    to_minute: b,
                })
            }
            (FreezeTime::Once(a), FreezeTime::Once(b)) if a < b => Ok(FreezeSchedule::Once {
                from_minute: a,
                to_minute: b,
            }),
            (FreezeTime::Once(_), FreezeTime::Once(_)) => {
                Err("the window ends before it starts".to_owned())
            }
            (FreezeTime::Daily(_), FreezeTime::Daily(_))
            | (FreezeTime::Weekly(_), FreezeTime::Weekly(_)) => Err(
                "the window starts and ends at the same time (to hold every plan, use `auto-apply #false`)"
                    .to_owned(),
            ),
            _ => Err(
                "`from` and `to` must have the same form (both \"HH:MM\", both \"Ddd HH:MM\" or both \"YYYY-MM-DD HH:MM\")"
                    .to_owned(),
            ),
        }
    }
}

impl FreezeWindow {
    /// Whether the window contains the instant `unix_s` (seconds since the epoch, UTC).
    pub fn contains(&self, unix_s: i64) -> bool {
        self.ends_in(unix_s).is_some()
    }

    /// When inside the window: seconds from `unix_s` until it ends.
    pub fn ends_in(&self, unix_s: i64) -> Option<i64> {
        let local_s = unix_s + i64::from(self.offset_minutes) * 60;
        let minute = local_s.div_euclid(60);
        let into_minute = local_s.rem_euclid(60);
        let cyclic = |period: i64, from: i64, to: i64| -> Option<i64> {
            // 1970-01-01 was a Thursday: Monday 00:00 is 3 days later.
            let pos = if period == WEEK {
                (minute - 4 * DAY).rem_euclid(WEEK)
            } else {
                minute.rem_euclid(period)
            };
            let inside = if from < to {
                from <= pos && pos < to
            } else {
                pos >= from || pos < to
            };
            inside.then(|| (to - pos).rem_euclid(period) * 60 - into_minute)
        };
        match self.schedule {
            FreezeSchedule::Daily {
                from_minute,
                to_minute,
            } => cyclic(DAY, from_minute.into(), to_minute.into()),
            FreezeSchedule::Weekly {
                from_minute,
                to_minute,
            } => cyclic(WEEK, from_minute.into(), to_minute.into()),
            FreezeSchedule::Once {
                from_minute,
                to_minute,
            } => (from_minute <= minute && minute < to_minute)
                .then(|| (to_minute - minute) * 60 - into_minute),
        }
    }

    /// `weekend (Fri 18:00 to Mon 06:00 UTC+00:00)`.
    pub fn describe(&self) -> String {
        let sign = if self.offset_minutes < 0 { '-' } else { '+' };
        let m = self.offset_minutes.unsigned_abs();
        format!(
            "{} ({} to {} UTC{sign}{:02}:{:02})",
            self.name,
            self.from,
            self.to,
            m / 60,
            m % 60
        )
    }
}

impl Reconcile {
    /// The freeze windows that contain `unix_s`.
    pub fn frozen_at(&self, unix_s: i64) -> Vec<&FreezeWindow> {
        self.freezes.iter().filter(|w| w.contains(unix_s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(from: &str, to: &str, zone: &str) -> FreezeWindow {
        let schedule = FreezeSchedule::new(
            FreezeTime::parse(from).unwrap(),
            FreezeTime::parse(to).unwrap(),
        )
        .unwrap();
        FreezeWindow {
            name: "w".into(),
            from: from.into(),
            to: to.into(),
            offset_minutes: parse_utc_offset(zone).unwrap(),
            schedule,
        }
    }

    /// Seconds since the epoch of a UTC civil time.
    fn at(y: i64, mo: i64, d: i64, h: i64, mi: i64) -> i64 {
        (days_from_civil(y, mo, d) * DAY + h * 60 + mi) * 60
    }

    #[test]
    fn a_weekend_window_crosses_monday_midnight() {
        let w = window("Fri 18:00", "Mon 06:00", "UTC");
        // 2026-12-04 is a Friday.
        assert!(!w.contains(at(2026, 12, 4, 17, 59)));
        assert!(w.contains(at(2026, 12, 4, 18, 0)));
        assert!(w.contains(at(2026, 12, 6, 12, 0)));
        assert!(w.contains(at(2026, 12, 7, 5, 59)));
        assert!(!w.contains(at(2026, 12, 7, 6, 0)));
        assert!(!w.contains(at(2026, 12, 2, 12, 0)));
        assert_eq!(w.ends_in(at(2026, 12, 7, 5, 0)), Some(3600));
        assert_eq!(w.ends_in(at(2026, 12, 4, 18, 0) + 30), Some(60 * 3600 - 30));
    }

    #[test]
    fn a_weekly_window_inside_one_week_and_the_epoch_weekday() {
        let w = window("Thu 00:00", "Thu 01:00", "UTC");
        // 1970-01-01 00:30 was a Thursday.
        assert!(w.contains(1800));
        assert!(!w.contains(3600));
        assert!(!w.contains(-1));
    }

    #[test]
    fn a_daily_window_crosses_midnight_and_the_offset_shifts_it() {
        let w = window("22:00", "06:00", "+02:00");
        // 22:00 at +02:00 is 20:00 UTC.
        assert!(!w.contains(at(2026, 12, 1, 19, 59)));
        assert!(w.contains(at(2026, 12, 1, 20, 0)));
        assert!(w.contains(at(2026, 12, 2, 3, 59)));
        assert!(!w.contains(at(2026, 12, 2, 4, 0)));
        let behind = window("09:00", "17:00", "-05:30");
        assert!(behind.contains(at(2026, 12, 1, 14, 30)));
        assert!(!behind.contains(at(2026, 12, 1, 14, 29)));
        assert!(!behind.contains(at(2026, 12, 1, 22, 30)));
    }

    #[test]
    fn a_dated_window_holds_once() {
        let w = window("2026-12-24 00:00", "2026-12-27 00:00", "UTC");
        assert!(w.contains(at(2026, 12, 24, 0, 0)));
        assert!(w.contains(at(2026, 12, 26, 23, 59)));
        assert!(!w.contains(at(2026, 12, 27, 0, 0)));
        assert!(!w.contains(at(2027, 12, 25, 0, 0)));
        assert_eq!(w.ends_in(at(2026, 12, 26, 23, 0)), Some(3600));
    }

    #[test]
    fn bad_times_and_offsets_say_what_is_accepted() {
        for bad in [
            "24:00",
            "7:00",
            "Fri",
            "Fry 18:00",
            "2026-02-30 00:00",
            "2026-13-01 00:00",
            "noon",
        ] {
            let e = FreezeTime::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(FreezeTime::parse("2028-02-29 12:00").is_ok());
        assert!(parse_utc_offset("Europe/Paris").is_err());
        assert!(parse_utc_offset("+15:00").is_err());
        assert_eq!(parse_utc_offset("-05:30"), Ok(-330));
        let same = FreezeSchedule::new(FreezeTime::Daily(60), FreezeTime::Daily(60));
        assert!(same.unwrap_err().contains("same time"));
        let mixed = FreezeSchedule::new(FreezeTime::Daily(60), FreezeTime::Weekly(60));
        assert!(mixed.unwrap_err().contains("same form"));
        let backwards = FreezeSchedule::new(FreezeTime::Once(60), FreezeTime::Once(0));
        assert!(backwards.unwrap_err().contains("before it starts"));
    }

    #[test]
    fn the_description_names_the_offset() {
        assert_eq!(
            window("Fri 18:00", "Mon 06:00", "-05:30").describe(),
            "w (Fri 18:00 to Mon 06:00 UTC-05:30)"
        );
    }
}
