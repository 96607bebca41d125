//! Kubernetes resource quantities (`3Gi`, `100`, `1.5`, `500m`, `1e3`), parsed exactly.
//!
//! Annotations carry quantities as strings; this module turns them into integers in a fixed unit
//! without floating point: [`parse_milli`] gives thousandths (TFLOPS are kept as milli-TFLOPS),
//! [`parse_bytes`] gives whole bytes and refuses fractions of a byte (`1m` is a thousandth of a
//! byte: almost certainly a typo for `1Mi`; Kubernetes warns about such memory values too).
//! Formatting back
//! ([`format_milli`], [`format_bytes`]) gives the short forms a person reads in `kubectl describe`.

/// Why a string is not a usable quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("is not a Kubernetes quantity")]
    Syntax,
    #[error("must not be negative")]
    Negative,
    #[error("is too large")]
    Overflow,
    #[error("is not a whole number of bytes (did you mean Mi or Gi?)")]
    FractionalBytes,
}

const MILLI: u128 = 1000;

/// Parses `text` and returns its value in thousandths of a unit, rounded up.
pub fn parse_milli(text: &str) -> Result<u64, QuantityError> {
    let (numerator, denominator) = parse_ratio(text)?;
    let milli = numerator
        .checked_mul(MILLI)
        .ok_or(QuantityError::Overflow)?
        .div_ceil(denominator);
    u64::try_from(milli).map_err(|_| QuantityError::Overflow)
}

/// Parses `text` as a number of bytes; a fraction of a byte is an error.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let (numerator, denominator) = parse_ratio(text)?;
    if !numerator.is_multiple_of(denominator) {
        return Err(QuantityError::FractionalBytes);
    }
    u64::try_from(numerator / denominator).map_err(|_| QuantityError::Overflow)
}

/// The exact value of `text` as `numerator / denominator`.
fn parse_ratio(text: &str) -> Result<(u128, u128), QuantityError> {
    let text = text.trim();
    let unsigned = match text.as_bytes().first() {
        Some(b'-') => {
            return match parse_ratio(&text[1..]) {
                Ok((0, _)) => Ok((0, 1)),
                Ok(_) => Err(QuantityError::Negative),
                Err(e) => Err(e),
            };
        }
        Some(b'+') => &text[1..],
        _ => text,
    };
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(QuantityError::Syntax);
    }

    let mut numerator: u128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        numerator = numerator
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(digit - b'0')))
            .ok_or(QuantityError::Overflow)?;
    }
    let mut denominator = pow(10, fraction.len() as u32)?;

    let (multiplier, divisor) = suffix_scale(suffix)?;
    numerator = numerator
        .checked_mul(multiplier)
        .ok_or(QuantityError::Overflow)?;
    denominator = denominator
        .checked_mul(divisor)
        .ok_or(QuantityError::Overflow)?;
    Ok((numerator, denominator))
}

/// The suffix as a ratio `multiplier / divisor`.
fn suffix_scale(suffix: &str) -> Result<(u128, u128), QuantityError> {
    let binary = |power: u32| Ok((1u128 << (10 * power), 1));
    let decimal = |exponent: u32| Ok((pow(10, exponent)?, 1));
    match suffix {
        "" => Ok((1, 1)),
        "n" => Ok((1, 1_000_000_000)),
        "u" => Ok((1, 1_000_000)),
        "m" => Ok((1, 1000)),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        exponent if exponent.starts_with(['e', 'E']) => {
            let digits = &exponent[1..];
            let (negative, digits) = match digits.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, digits.strip_prefix('+').unwrap_or(digits)),
            };
            if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(QuantityError::Syntax);
            }
            let scale = pow(10, digits.parse().map_err(|_| QuantityError::Syntax)?)?;
            Ok(if negative { (1, scale) } else { (scale, 1) })
        }
        _ => Err(QuantityError::Syntax),
    }
}

fn pow(base: u128, exponent: u32) -> Result<u128, QuantityError> {
    base.checked_pow(exponent).ok_or(QuantityError::Overflow)
}

/// Formats thousandths as a decimal number: `100000` -> `100`, `1500` -> `1.5`.
pub fn format_milli(milli: u64) -> String {
    let (whole, fraction) = (milli / 1000, milli % 1000);
    if fraction == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{fraction:03}")
            .trim_end_matches('0')
            .to_owned()
    }
}

/// Formats bytes with the largest suffix that divides them, binary first (`3221225472` ->
/// `3Gi`), then decimal (`1000000000` -> `1G`), so a value reads the way it was likely written.
pub fn format_bytes(bytes: u64) -> String {
    const BINARY: [&str; 6] = ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"];
    const DECIMAL: [&str; 6] = ["E", "P", "T", "G", "M", "k"];
    if bytes == 0 {
        return "0".to_owned();
    }
    for (index, suffix) in BINARY.iter().enumerate() {
        let unit = 1u64 << (10 * (6 - index));
        if bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    for (index, suffix) in DECIMAL.iter().enumerate() {
        let unit = 10u64.pow(3 * (6 - index as u32));
        if bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_forms_users_write() {
        assert_eq!(parse_bytes("3Gi"), Ok(3 << 30));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("1e3"), Ok(1000));
        assert_eq!(
            parse_bytes("100m"),
            Err(QuantityError::FractionalBytes),
            "a fraction of a byte is a typo, not a size"
        );
        assert_eq!(parse_bytes("0.5"), Err(QuantityError::FractionalBytes));
        assert_eq!(parse_bytes("1500m"), Err(QuantityError::FractionalBytes));
        assert_eq!(parse_bytes("2000m"), Ok(2));
        assert_eq!(parse_bytes(" 42 "), Ok(42));
        assert_eq!(parse_milli("100"), Ok(100_000));
        assert_eq!(parse_milli("0.5"), Ok(500));
        assert_eq!(parse_milli("250m"), Ok(250));
        assert_eq!(parse_milli("1.0005"), Ok(1001), "rounds up");
        assert_eq!(parse_milli("-0"), Ok(0));
        assert_eq!(parse_milli("1E-3"), Ok(1));
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in [
            "", "Gi", "3Gx", "1.2.3", "abc", ".", "3 Gi", "1e", "1e100000", "0x10",
        ] {
            assert_eq!(parse_bytes(bad), Err(QuantityError::Syntax), "{bad:?}");
        }
        assert_eq!(parse_bytes("-1Gi"), Err(QuantityError::Negative));
        assert_eq!(parse_bytes("99999999999Ei"), Err(QuantityError::Overflow));
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_bytes(3 << 30), "3Gi");
        assert_eq!(format_bytes(1536 << 20), "1536Mi");
        assert_eq!(format_bytes(1000), "1k");
        assert_eq!(format_bytes(1_000_000_000), "1G");
        assert_eq!(format_bytes(1234), "1234");
        assert_eq!(format_bytes(0), "0");
        assert_eq!(format_milli(100_000), "100");
        assert_eq!(format_milli(1500), "1.5");
        assert_eq!(format_milli(5), "0.005");
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,24}") {
            let _ = parse_bytes(&text);
            let _ = parse_milli(&text);
        }

        #[test]
        fn formatting_round_trips(bytes in any::<u32>(), milli in any::<u32>()) {
            prop_assert_eq!(parse_bytes(&format_bytes(u64::from(bytes))), Ok(u64::from(bytes)));
            prop_assert_eq!(parse_milli(&format_milli(u64::from(milli))), Ok(u64::from(milli)));
        }
    }
}
