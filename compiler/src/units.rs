//! Quantities with units: sizes, bandwidths and durations.
//!
//! Values are parsed exactly (decimal arithmetic on integers, no floating
//! point), so `"1.5TiB"` is exactly 1,649,267,441,664 bytes. Sizes are
//! `vm_config::size`, the one size grammar the runtime parses with too
//! (re-exported here); bandwidths use the same grammar with their own units.

use vm_config::size::parse_quantity;
pub use vm_config::size::{SIZE_UNITS, UnitError, format_size, human_size, parse_size};

/// Bandwidth units: decimal multiples of a bit per second.
pub const BANDWIDTH_UNITS: &[(&str, u128)] = &[
    ("bps", 1),
    ("Kbps", 1_000),
    ("Mbps", 1_000_000),
    ("Gbps", 1_000_000_000),
    ("Tbps", 1_000_000_000_000),
];

/// Duration units, in milliseconds.
pub const DURATION_UNITS: &[(&str, u128)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Parses a bandwidth such as `"25Gbps"` into bits per second.
pub fn parse_bandwidth(text: &str) -> Result<u64, UnitError> {
    parse_quantity(text, BANDWIDTH_UNITS, "bits per second")
}

/// Parses a duration such as `"90s"` or `"1h30m"` into milliseconds.
pub fn parse_duration(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(UnitError::Malformed(text.to_owned()));
    }
    if t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(UnitError::MissingUnit(text.to_owned()));
    }
    let mut rest = t;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(UnitError::Malformed(text.to_owned()));
        }
        let number: u128 = rest[..digits]
            .parse()
            .map_err(|_| UnitError::Overflow(text.to_owned()))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let Some(&(_, ms)) = DURATION_UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(UnitError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            });
        };
        total = number
            .checked_mul(ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| UnitError::Overflow(text.to_owned()))?;
    }
    u64::try_from(total).map_err(|_| UnitError::Overflow(text.to_owned()))
}

/// Formats bits per second with the largest decimal unit that divides them.
pub fn format_bandwidth(bps: u64) -> String {
    for &(unit, m) in BANDWIDTH_UNITS.iter().rev() {
        let m = m as u64;
        if bps >= m && bps.is_multiple_of(m) {
            return format!("{}{unit}", bps / m);
        }
    }
    format!("{bps}bps")
}

/// Formats milliseconds as a combined duration (`1h30m`).
pub fn format_duration(mut ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for &(unit, m) in DURATION_UNITS.iter().rev() {
        let m = m as u64;
        if ms >= m {
            out.push_str(&format!("{}{unit}", ms / m));
            ms %= m;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_and_durations() {
        assert_eq!(parse_bandwidth("25Gbps"), Ok(25_000_000_000));
        assert_eq!(parse_bandwidth("1.5Mbps"), Ok(1_500_000));
        assert_eq!(parse_duration("90s"), Ok(90_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("15m"), Ok(900_000));
        assert_eq!(
            parse_duration("15"),
            Err(UnitError::MissingUnit("15".into()))
        );
        assert!(matches!(
            parse_duration("15x"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert_eq!(format_duration(5_400_000), "1h30m");
        assert_eq!(format_size(32 << 30), "32GiB");
        assert_eq!(format_bandwidth(25_000_000_000), "25Gbps");
    }
}
