//! Format and checksum rules for what people type at registration: resident identity card
//! numbers (GB 11643-1999), unified social credit codes (GB 32100-2015), mobile numbers, email
//! addresses, usernames and passwords. Pure functions; each returns the problem in words.

/// An 18-character resident identity card number: 6-digit region, 8-digit birth date, 3-digit
/// sequence, and a check character (ISO 7064 MOD 11-2; `X` stands for 10).
pub fn check_id_card(raw: &str) -> Result<String, &'static str> {
    let id = raw.trim().to_ascii_uppercase();
    let bytes = id.as_bytes();
    if bytes.len() != 18 {
        return Err("must be 18 characters");
    }
    if !bytes[..17].iter().all(u8::is_ascii_digit) || !(bytes[17].is_ascii_digit() || bytes[17] == b'X') {
        return Err("must be 17 digits and a digit or X");
    }
    if !(b'1'..=b'8').contains(&bytes[0]) {
        return Err("region code is not valid");
    }
    let digit = |i: usize| u32::from(bytes[i] - b'0');
    let year = digit(6) * 1000 + digit(7) * 100 + digit(8) * 10 + digit(9);
    let month = digit(10) * 10 + digit(11);
    let day = digit(12) * 10 + digit(13);
    if !(1900..=2100).contains(&year) || !valid_date(year, month, day) {
        return Err("birth date is not a valid date");
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let sum: u32 = (0..17).map(|i| digit(i) * WEIGHTS[i]).sum();
    if CHECK[(sum % 11) as usize] != bytes[17] {
        return Err("check digit does not match");
    }
    Ok(id)
}

fn valid_date(year: u32, month: u32, day: u32) -> bool {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// The 31 characters of a unified social credit code (no I, O, S, V, Z).
const USCC_ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// An 18-character unified social credit code: registration authority, entity type, 6-digit
/// region, 9-character organisation code, and a check character (weights 3^i mod 31).
pub fn check_credit_code(raw: &str) -> Result<String, &'static str> {
    let code = raw.trim().to_ascii_uppercase();
    let bytes = code.as_bytes();
    if bytes.len() != 18 {
        return Err("must be 18 characters");
    }
    let mut values = [0u32; 18];
    for (i, b) in bytes.iter().enumerate() {
        match USCC_ALPHABET.iter().position(|a| a == b) {
            Some(v) => values[i] = v as u32,
            None => return Err("contains a character not used in credit codes"),
        }
    }
    if !bytes[2..8].iter().all(u8::is_ascii_digit) {
        return Err("region code must be 6 digits");
    }
    let mut weight = 1u32;
    let mut sum = 0u32;
    for v in &values[..17] {
        sum += v * weight;
        weight = weight * 3 % 31;
    }
    let check = (31 - sum % 31) % 31;
    if values[17] != check {
        return Err("check character does not match");
    }
    Ok(code)
}

/// A mainland mobile number (11 digits starting 1[3-9]), with an optional +86.
pub fn check_mobile(raw: &str) -> Result<String, &'static str> {
    let n = raw.trim().trim_start_matches("+86").trim();
    let b = n.as_bytes();
    if b.len() == 11 && b[0] == b'1' && (b'3'..=b'9').contains(&b[1]) && b.iter().all(u8::is_ascii_digit) {
        Ok(n.to_owned())
    } else {
        Err("must be an 11-digit mobile number starting with 13–19")
    }
}

/// A plausible email address: one `@`, a non-empty local part, a dotted domain, no spaces.
/// (Deliverability is proven by the activation mail, not by a pattern.)
pub fn check_email(raw: &str) -> Result<String, &'static str> {
    let e = raw.trim();
    if e.len() > 254 {
        return Err("is too long");
    }
    let Some((local, domain)) = e.split_once('@') else { return Err("must contain @") };
    let ok = !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>' || c == '"' || c == ',');
    if ok {
        Ok(e.to_owned())
    } else {
        Err("is not an email address")
    }
}

/// 3–32 characters: letters, digits, `_`, `-`, `.`, starting with a letter.
pub fn check_username(raw: &str) -> Result<String, &'static str> {
    let u = raw.trim();
    let ok = (3..=32).contains(&u.len())
        && u.starts_with(|c: char| c.is_ascii_alphabetic())
        && u.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(u.to_owned())
    } else {
        Err("3–32 letters, digits, _ - or ., starting with a letter")
    }
}

/// At least 10 characters with letters and digits; at most 128 (argon2 input stays bounded).
pub fn check_password(raw: &str) -> Result<(), &'static str> {
    if raw.chars().count() < 10 {
        return Err("at least 10 characters");
    }
    if raw.len() > 128 {
        return Err("at most 128 bytes");
    }
    if !raw.chars().any(|c| c.is_alphabetic()) || !raw.chars().any(|c| c.is_ascii_digit()) {
        return Err("must contain letters and digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a valid ID number from its first 17 digits (the test's own arithmetic, spelled out
    /// differently from the checker: a table of remainders to check characters).
    fn with_check(first17: &str) -> String {
        let weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
        let sum: u32 = first17.bytes().zip(weights).map(|(b, w)| u32::from(b - b'0') * w).sum();
        let check = ["1", "0", "X", "9", "8", "7", "6", "5", "4", "3", "2"][(sum % 11) as usize];
        format!("{first17}{check}")
    }

    #[test]
    fn id_cards() {
        // The example of GB 11643-1999 itself.
        assert_eq!(check_id_card("11010519491231002x"), Ok("11010519491231002X".to_owned()));
        assert_eq!(check_id_card("440524188001010014"), Err("birth date is not a valid date"));
        assert_eq!(check_id_card("110105194912310021"), Err("check digit does not match"));
        assert!(check_id_card(&with_check("44030019900229123")).is_err(), "1990 is not a leap year");
        assert!(check_id_card(&with_check("44030019920229123")).is_ok());
        assert_eq!(check_id_card("4403001992022912"), Err("must be 18 characters"));
        assert!(check_id_card("44030019920229123Y").is_err());
        assert!(check_id_card("04030019920229123X").is_err());
    }

    #[test]
    fn credit_codes() {
        // Published codes of real organisations.
        assert!(check_credit_code("91350100M000100Y43").is_ok());
        assert!(check_credit_code("91440300708461136T").is_ok());
        assert_eq!(check_credit_code("91350100M000100Y44"), Err("check character does not match"));
        assert_eq!(check_credit_code("91350100M000100YI3"), Err("contains a character not used in credit codes"));
        assert!(check_credit_code("9135").is_err());
    }

    #[test]
    fn contacts() {
        assert_eq!(check_mobile("+86 13800138000"), Ok("13800138000".to_owned()));
        assert!(check_mobile("12800138000").is_err());
        assert!(check_email("li.wei@example.cn").is_ok());
        assert!(check_email("li wei@example.cn").is_err());
        assert!(check_email("<script>@x.cn").is_err());
        assert!(check_email("a@b").is_err());
        assert!(check_username("zhang_san").is_ok());
        assert!(check_username("1abc").is_err());
        assert!(check_password("short1").is_err());
        assert!(check_password("longenoughpassword").is_err());
        assert!(check_password("longenough123").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_valid_id_number_has_one_check_character(seq in 0u32..1000, day in 1u32..=28, month in 1u32..=12, year in 1930u32..2020) {
            let first17 = format!("440305{year:04}{month:02}{day:02}{seq:03}");
            let good = with_check(&first17);
            proptest::prop_assert!(check_id_card(&good).is_ok());
            for c in "0123456789X".chars() {
                let candidate = format!("{first17}{c}");
                if candidate != good {
                    proptest::prop_assert!(check_id_card(&candidate).is_err());
                }
            }
        }
    }
}
