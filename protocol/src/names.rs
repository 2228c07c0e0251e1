//! Validation of user-supplied names.

use crate::error::FieldError;

/// Checks that `value` is a DNS label (RFC 1123): 1..=63 chars of `a-z0-9-`,
/// not starting or ending with `-`. `field` names the input in the error.
pub fn validate_dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(FieldError::new(
            field,
            format_args!("{value:?} is longer than 63 characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(FieldError::new(
            field,
            format_args!("{value:?} may contain only lowercase letters, digits and '-'"),
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(FieldError::new(
            field,
            format_args!("{value:?} must not start or end with '-'"),
        ));
    }
    Ok(())
}

/// A release version (`1.4.0`, `2026.11.23+b5`): letters, digits and
/// `. + - _`, starting with a letter or digit, at most 64 characters; safe
/// in a path, a URL and a systemd unit name.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b".+-_".contains(&b))
        && v.as_bytes()[0].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        for ok in ["0.1.0", "1.2.3-rc.1", "2026.11.23+build5"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in ["", "-1", "../x", "1 2", "a/b", "v;rm", ".."] {
            assert!(!valid_version(bad), "{bad}");
        }
    }

    #[test]
    fn accepts_labels() {
        for ok in ["a", "node-1", "n0", &"x".repeat(63)] {
            assert!(validate_dns_label("name", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_labels_naming_the_field() {
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            let err = validate_dns_label("name", bad).unwrap_err();
            assert!(err.to_string().starts_with("name: "), "{err}");
            assert_eq!(err.field, "name");
        }
    }
}
