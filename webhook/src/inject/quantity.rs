//! Kubernetes resource quantities in canonical form, as the API server writes
//! them (`2000m` -> `2`, `1024Mi` -> `1Gi`, `0.5` -> `500m`).
//!
//! Values are held exactly as an integer number of nano-units, which covers
//! every quantity a container resource can sensibly carry; anything finer is
//! rounded up to `1n`, as Kubernetes does.

use std::fmt;

/// A parse failure, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    DecimalSi,
    BinarySi,
    DecimalExponent,
}

const NANO: i128 = 1_000_000_000;

/// Parses a quantity and writes it in Kubernetes' canonical form.
pub fn canonicalize(input: &str) -> Result<String, QuantityError> {
    let (nanos, format) = parse(input)?;
    Ok(format_canonical(nanos, format))
}

fn parse(input: &str) -> Result<(i128, Format), QuantityError> {
    let err = |why: &str| QuantityError(format!("quantity {input:?} {why}"));
    let s = input.trim();
    if s.is_empty() {
        return Err(err("is empty"));
    }
    let (negative, s) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(err("has no valid number"));
    }
    // The number as digits with a decimal exponent: value = digits * 10^exp10.
    let digits = format!("{whole}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(err("too large"));
    }
    let mantissa: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| err("has no valid number"))?
    };
    let mut exp10 = -(frac.len() as i32);
    let mut factor: i128 = 1;
    let format = match suffix {
        "" => Format::DecimalSi,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
                .iter()
                .position(|p| *p == suffix)
                .unwrap_or(0)
                + 1;
            factor = 1024_i128.pow(power as u32);
            Format::BinarySi
        }
        "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => {
            exp10 += match suffix {
                "n" => -9,
                "u" => -6,
                "m" => -3,
                "k" => 3,
                "M" => 6,
                "G" => 9,
                "T" => 12,
                "P" => 15,
                _ => 18,
            };
            Format::DecimalSi
        }
        _ => {
            let exp = suffix
                .strip_prefix(['e', 'E'])
                .ok_or_else(|| err("has an unknown suffix"))?;
            exp10 += exp
                .parse::<i32>()
                .map_err(|_| err("has an unknown suffix"))?;
            Format::DecimalExponent
        }
    };
    // nanos = mantissa * factor * 10^(exp10 + 9), rounded up.
    let scale = exp10 + 9;
    let base = mantissa
        .checked_mul(factor)
        .ok_or_else(|| err("too large"))?;
    let nanos = if scale >= 0 {
        10_i128
            .checked_pow(scale as u32)
            .and_then(|p| base.checked_mul(p))
            .filter(|n| *n <= i128::from(i64::MAX) * NANO)
            .ok_or_else(|| err("too large"))?
    } else {
        let divisor = 10_i128.checked_pow((-scale) as u32).unwrap_or(i128::MAX);
        (base + divisor - 1) / divisor
    };
    Ok((if negative { -nanos } else { nanos }, format))
}

fn format_canonical(nanos: i128, format: Format) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.abs();
    if abs == 0 {
        return "0".to_owned();
    }
    // Binary suffixes only for whole numbers of at least 1024.
    if format == Format::BinarySi && abs % NANO == 0 && abs / NANO >= 1024 {
        let mut value = abs / NANO;
        let mut power = 0;
        while power < 6 && value % 1024 == 0 {
            value /= 1024;
            power += 1;
        }
        let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][power];
        return format!("{sign}{value}{suffix}");
    }
    // Decimal: the largest exponent, a multiple of 3, that keeps the mantissa whole.
    let mut value = abs;
    let mut exp = -9;
    while value % 1000 == 0 && exp < 18 {
        value /= 1000;
        exp += 3;
    }
    let suffix = match (format, exp) {
        (Format::DecimalExponent, 0) => String::new(),
        (Format::DecimalExponent, e) => format!("e{e}"),
        (_, -9) => "n".to_owned(),
        (_, -6) => "u".to_owned(),
        (_, -3) => "m".to_owned(),
        (_, 0) => String::new(),
        (_, 3) => "k".to_owned(),
        (_, 6) => "M".to_owned(),
        (_, 9) => "G".to_owned(),
        (_, 12) => "T".to_owned(),
        (_, 15) => "P".to_owned(),
        _ => "E".to_owned(),
    };
    format!("{sign}{value}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::canonicalize;

    #[test]
    fn writes_quantities_in_kubernetes_canonical_form() {
        for (input, want) in [
            ("2000m", "2"),
            ("4000m", "4"),
            ("100m", "100m"),
            ("1500m", "1500m"),
            ("0.5", "500m"),
            ("1024Mi", "1Gi"),
            ("1500Mi", "1500Mi"),
            ("128Mi", "128Mi"),
            ("0.5Gi", "512Mi"),
            ("1000", "1k"),
            ("1k", "1k"),
            ("1000k", "1M"),
            ("512", "512"),
            ("1Ki", "1Ki"),
            ("0.5Ki", "512"),
            ("1e3", "1e3"),
            ("0", "0"),
            ("0.1m", "100u"),
            ("-2000m", "-2"),
        ] {
            assert_eq!(canonicalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_malformed_quantities() {
        for bad in ["", "abc", "1.2.3", "10x", "Mi", "1e", "."] {
            assert!(canonicalize(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
