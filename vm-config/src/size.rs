//! The one size grammar: `NUMBER UNIT`, parsed exactly (decimal arithmetic on integers,
//! no floating point), so `"1.5TiB"` is exactly 1,649,267,441,664 bytes and `"100MB"`
//! exactly 100,000,000.
//!
//! [`parse_quantity`] is the grammar for any table of units; sizes are one table of it
//! ([`SIZE_UNITS`]). The compiler's bandwidths use the same grammar with their own table.

/// Size units: binary and decimal multiples of a byte. The first six are the binary
/// ones, smallest first ([`format_size`] and [`human_size`] use only those).
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

/// Parses `NUMBER UNIT` against a unit table, returning base units (`base` names them
/// in errors: "bytes"). The number may have `_` separators and a decimal fraction; the
/// result must be a whole number of base units.
pub fn parse_quantity(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32GiB"), Ok(32 << 30));
        assert_eq!(parse_size("1600GB"), Ok(1_600_000_000_000));
        assert_eq!(parse_size("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1_024 MiB"), Ok(1 << 30));
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
    fn formatting_is_exact_or_says_it_rounds() {
        assert_eq!(format_size(32 << 30), "32GiB");
        assert_eq!(format_size(100_000_000), "100000000B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(human_size(100_000_000), "95.37MiB");
        assert_eq!(human_size(3 << 39), "1.5TiB");
        for bytes in [1u64, 4096, 16 << 20, 8 << 40, 1_000_000_000] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
    }
}
