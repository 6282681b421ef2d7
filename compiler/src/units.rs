//! Quantities with units: sizes, bandwidths and durations.
//!
//! Values are parsed exactly (decimal arithmetic on integers, no floating
//! point), so `"1.5TiB"` is exactly 1,649,267,441,664 bytes.

/// Size units: binary and decimal multiples of a byte.
pub const SIZE_UNITS: &[(&str, u128)] = &[
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("PB", 1_000_000_000_000_000),
];

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

/// Why a quantity did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// A number without a unit.
    #[error("`{0}` has no unit")]
    MissingUnit(String),
    /// A unit we do not know.
    #[error("unknown unit `{unit}` in `{text}`")]
    UnknownUnit {
        /// The whole text.
        text: String,
        /// The unit part.
        unit: String,
    },
    /// Not a number followed by a unit.
    #[error("`{0}` is not a number followed by a unit")]
    Malformed(String),
    /// The value does not come out as a whole number of the base unit.
    #[error("`{0}` is not a whole number of {1}")]
    Fraction(String, &'static str),
    /// Too large to represent.
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Parses `NUMBER UNIT` against a unit table, returning base units.
fn parse_quantity(
    text: &str,
    units: &[(&str, u128)],
    base: &'static str,
) -> Result<u64, UnitError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    if number.is_empty() {
        return Err(UnitError::Malformed(text.to_owned()));
    }
    if unit.is_empty() {
        return Err(UnitError::MissingUnit(text.to_owned()));
    }
    let Some(&(_, multiplier)) = units.iter().find(|(u, _)| *u == unit) else {
        return Err(UnitError::UnknownUnit {
            text: text.to_owned(),
            unit: unit.to_owned(),
        });
    };
    let value = scaled(number, multiplier).ok_or_else(|| UnitError::Malformed(text.to_owned()))?;
    let Some(value) = value else {
        return Err(UnitError::Fraction(text.to_owned(), base));
    };
    u64::try_from(value).map_err(|_| UnitError::Overflow(text.to_owned()))
}

/// `number * multiplier` exactly; `None` when malformed, `Some(None)` when
/// the result is not whole.
fn scaled(number: &str, multiplier: u128) -> Option<Option<u128>> {
    let number: String = number.chars().filter(|c| *c != '_').collect();
    let mut parts = number.splitn(2, '.');
    let whole = parts.next()?;
    let frac = parts.next().unwrap_or("");
    if whole.is_empty() || frac.contains('.') || (number.contains('.') && frac.is_empty()) {
        return None;
    }
    if frac.len() > 18 || whole.len() > 30 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let denominator = 10u128.pow(frac.len() as u32);
    let total = whole.checked_mul(multiplier)?;
    let frac_scaled = frac_value.checked_mul(multiplier)?;
    if frac_scaled % denominator != 0 {
        return Some(None);
    }
    Some(Some(total.checked_add(frac_scaled / denominator)?))
}

/// Parses a size such as `"32GiB"` or `"1600GB"` into bytes.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    parse_quantity(text, SIZE_UNITS, "bytes")
}

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

/// Formats bytes with the largest binary unit that divides them exactly.
pub fn format_size(bytes: u64) -> String {
    for &(unit, m) in SIZE_UNITS[..6].iter().rev() {
        let m = m as u64;
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    format!("{bytes}B")
}

/// Formats bytes for reading: exact when a binary unit divides them,
/// otherwise rounded to two decimals of the largest unit that fits.
pub fn human_size(bytes: u64) -> String {
    for &(unit, m) in SIZE_UNITS[..6].iter().rev() {
        let m = m as u64;
        if bytes >= m {
            if bytes.is_multiple_of(m) {
                return format!("{}{unit}", bytes / m);
            }
            let v = format!("{:.2}", bytes as f64 / m as f64);
            let v = v.trim_end_matches('0').trim_end_matches('.');
            return format!("{v}{unit}");
        }
    }
    format!("{bytes}B")
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
    fn sizes() {
        assert_eq!(parse_size("32GiB"), Ok(32 << 30));
        assert_eq!(parse_size("1600GB"), Ok(1_600_000_000_000));
        assert_eq!(parse_size("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("32"), Err(UnitError::MissingUnit("32".into())));
        assert!(matches!(
            parse_size("32Gb"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_size("0.3B"), Err(UnitError::Fraction(..))));
        assert!(matches!(parse_size("GiB"), Err(UnitError::Malformed(..))));
        assert!(matches!(parse_size("1.GiB"), Err(UnitError::Malformed(..))));
        assert!(matches!(
            parse_size("99999999999999999PiB"),
            Err(UnitError::Overflow(..))
        ));
    }

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
