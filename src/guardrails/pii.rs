//! `pii`: e-mail addresses, phone numbers, payment cards, US social security numbers, IBANs, IP
//! addresses.
//!
//! A regex finds candidates; code then decides what a regex cannot: the Luhn digit and issuer
//! prefix of a card, the valid ranges of an SSN, an IBAN's mod-97 checksum, whether a dotted quad
//! is a version string. Formats are required where bare digits would be ambiguous: an SSN needs
//! its dashes (or spaces), a national phone number a separator; nine or ten bare digits are an
//! order number as often as anything else.

use std::ops::Range;

use super::config::select_kinds;
use super::detector::{char_at, char_before, Detector, Hit, MatchKind, PatternSet, Rule, B};

const KINDS: [(&str, &str); 6] = [
    ("email", "[EMAIL]"),
    ("phone", "[PHONE]"),
    ("card", "[CARD]"),
    ("ssn", "[SSN]"),
    ("iban", "[IBAN]"),
    ("ip", "[IP]"),
];

pub(crate) struct Pii {
    set: PatternSet,
    kinds: Vec<MatchKind>,
}

impl Pii {
    pub fn new(wanted: &[String]) -> Result<Pii, String> {
        let names: Vec<&str> = KINDS.iter().map(|(name, _)| *name).collect();
        let enabled = select_kinds(wanted, &names)?;
        let kinds: Vec<MatchKind> = KINDS
            .iter()
            .filter(|(name, _)| enabled.contains(name))
            .map(|(name, placeholder)| MatchKind::new(name, placeholder))
            .collect();
        let mut rules = Vec::new();
        for (index, kind) in kinds.iter().enumerate() {
            for (pattern, validate) in rules_of(&kind.name) {
                rules.push(Rule {
                    pattern,
                    kind: index as u16,
                    validate: Some(validate),
                });
            }
        }
        Ok(Pii {
            set: PatternSet::new(rules)?,
            kinds,
        })
    }
}

impl Detector for Pii {
    fn kinds(&self) -> &[MatchKind] {
        &self.kinds
    }

    fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        self.set.scan(text, out);
    }
}

type Validate = fn(&str, Range<usize>) -> Option<Range<usize>>;

/// Candidate patterns per kind. Kinds are listed (and so tried at one start) cards first, so
/// that a card's digit groups are not read as a phone number.
fn rules_of(kind: &str) -> Vec<(String, Validate)> {
    let octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    match kind {
        "card" => vec![
            (format!("{B}[0-9]{{13,19}}{B}"), card as Validate),
            (
                format!("{B}[0-9]{{4}}(?:[ -][0-9]{{4}}){{3}}(?:[ -][0-9]{{3}})?{B}"),
                card,
            ),
            (
                format!("{B}[0-9]{{4}}[ -][0-9]{{6}}[ -][0-9]{{4,5}}{B}"),
                card,
            ),
        ],
        "ssn" => vec![(format!("{B}[0-9]{{3}}[- ][0-9]{{2}}[- ][0-9]{{4}}{B}"), ssn)],
        "iban" => vec![(
            format!("{B}[A-Z]{{2}}[0-9]{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}(?: ?[A-Z0-9]{{1,3}})?{B}"),
            iban,
        )],
        "phone" => vec![
            // E.164 with optional grouping: +44 20 7946 0958, +1 (415) 555-2671, +4930901820.
            (r"\+[1-9](?:[ .-]?\(?[0-9]\)?){6,14}".to_owned() + B, e164),
            // North America: (415) 555-2671, 415-555-2671, 415.555.2671, 1-415-555-2671.
            (
                format!(
                    r"(?:{B}1[ .-]?)?(?:\([0-9]{{3}}\) ?|{B}[0-9]{{3}}[ .-])[0-9]{{3}}[ .-][0-9]{{4}}{B}"
                ),
                national,
            ),
            // Trunk-0 national numbers: 020 7946 0958, 07700 900123, 030 12345678.
            (
                format!("{B}0[1-9][0-9]{{1,3}}[ -][0-9]{{3,4}}[ -]?[0-9]{{3,4}}{B}"),
                national,
            ),
            // France: 01 23 45 67 89, 06.12.34.56.78.
            (format!("{B}0[1-9](?:[ .][0-9]{{2}}){{4}}{B}"), national),
        ],
        "ip" => vec![
            (format!("{B}{octet}(?:\\.{octet}){{3}}{B}"), ipv4),
            (
                r"(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:\.[0-9]{1,3}){0,3}".into(),
                ipv6,
            ),
        ],
        "email" => vec![(
            format!(
                r"{B}[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{{2,24}}{B}"
            ),
            email,
        )],
        _ => vec![],
    }
}

fn digits(candidate: &str) -> Vec<u8> {
    candidate
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// A candidate that is one group of a longer run of numbers (`1234 5678 9012 3456 7890`) is
/// not a card, an SSN or a phone number on its own.
fn inside_number_run(text: &str, span: &Range<usize>) -> bool {
    let bytes = text.as_bytes();
    let before = span
        .start
        .checked_sub(2)
        .and_then(|at| bytes.get(at..span.start));
    let after = bytes.get(span.end..span.end + 2);
    let joined = |pair: Option<&[u8]>, digit_first: bool| match pair {
        Some([a, b]) => {
            let (digit, sep) = if digit_first { (a, b) } else { (b, a) };
            digit.is_ascii_digit() && matches!(sep, b'-' | b' ' | b'.' | b'/')
        }
        _ => false,
    };
    joined(before, true) || joined(after, false)
}

pub(crate) fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Issuer prefix and length of the card networks in use (Visa, Mastercard, Amex, Discover, JCB,
/// Diners, UnionPay, Maestro): a Luhn-valid number with neither is not a card.
fn issuer_fits(digits: &[u8]) -> bool {
    let prefix = |n: usize| {
        digits
            .iter()
            .take(n)
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d))
    };
    let len = digits.len();
    match digits.first() {
        Some(4) => matches!(len, 13 | 16 | 19),
        Some(2) => (2221..=2720).contains(&prefix(4)) && len == 16,
        Some(5) => match prefix(2) {
            51..=55 => len == 16,
            50 | 56..=59 => (12..=19).contains(&len),
            _ => false,
        },
        Some(3) => match prefix(2) {
            34 | 37 => len == 15,
            35 => (3528..=3589).contains(&prefix(4)) && (16..=19).contains(&len),
            30 | 36 | 38 | 39 => (14..=19).contains(&len),
            _ => false,
        },
        Some(6) => (16..=19).contains(&len),
        _ => false,
    }
}

fn card(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    // One kind of separator throughout: `4111 1111-1111 1111` is not how cards are written.
    let mut separators = candidate.bytes().filter(|b| !b.is_ascii_digit());
    if let Some(first) = separators.next() {
        if separators.any(|b| b != first) {
            return None;
        }
    }
    let digits = digits(candidate);
    let distinct = digits.iter().any(|d| *d != digits[0]);
    (distinct && luhn_valid(&digits) && issuer_fits(&digits) && !inside_number_run(text, &span))
        .then_some(span)
}

fn ssn(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    if candidate.get(3..4) != candidate.get(6..7) {
        return None;
    }
    let d = digits(candidate);
    let number = |range: Range<usize>| {
        d.get(range)
            .map(|ds| ds.iter().fold(0u32, |acc, &x| acc * 10 + u32::from(x)))
    };
    let (area, group, serial) = (number(0..3)?, number(3..5)?, number(5..9)?);
    let valid = area != 0 && area != 666 && area < 900 && group != 0 && serial != 0;
    (valid && !inside_number_run(text, &span)).then_some(span)
}

/// IBAN lengths by country (ISO 13616 registry); other countries are checked by checksum and
/// the general 15..=34 length only.
const IBAN_LENGTHS: [(&str, usize); 50] = [
    ("AD", 24),
    ("AE", 23),
    ("AT", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("CH", 21),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("EE", 20),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IS", 26),
    ("IT", 27),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MT", 31),
    ("NL", 18),
    ("NO", 15),
    ("PL", 28),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("TR", 26),
    ("UA", 29),
];

fn iban(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let compact: Vec<u8> = text
        .get(span.clone())?
        .bytes()
        .filter(|b| *b != b' ')
        .collect();
    let country = std::str::from_utf8(compact.get(..2)?).ok()?;
    let length_fits = match IBAN_LENGTHS.iter().find(|(code, _)| *code == country) {
        Some((_, length)) => compact.len() == *length,
        None => (15..=34).contains(&compact.len()),
    };
    if !length_fits {
        return None;
    }
    // Move the first four characters to the end, read letters as 10..35, take mod 97.
    let rotated = compact[4..].iter().chain(&compact[..4]);
    let mut remainder = 0u32;
    for &c in rotated {
        let value = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return None,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    (remainder == 1).then_some(span)
}

fn e164(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    let count = candidate.bytes().filter(u8::is_ascii_digit).count();
    let opens = candidate.matches('(').count();
    let balanced = opens == candidate.matches(')').count() && opens <= 1;
    let after_word = char_before(text, span.start).is_some_and(|c| c.is_alphanumeric());
    ((8..=15).contains(&count) && balanced && !after_word).then_some(span)
}

fn national(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    let count = candidate.bytes().filter(u8::is_ascii_digit).count();
    let after_plus = char_before(text, span.start) == Some('+');
    ((9..=12).contains(&count) && !after_plus && !inside_number_run(text, &span)).then_some(span)
}

fn ipv4(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let before = char_before(text, span.start);
    // Part of a longer dotted sequence (an OID, a 5-part version): not an address.
    let longer = matches!(before, Some('.' | '-' | '_'))
        || (char_at(text, span.end) == Some('.')
            && char_at(text, span.end + 1).is_some_and(|c| c.is_ascii_alphanumeric()));
    // `v1.2.3.4`, `Chrome/120.0.0.0`, `version 1.0.0.1`: a version, not an address.
    let version_mark = matches!(before, Some('v' | 'V'))
        || (before == Some('/')
            && char_before(text, span.start - 1).is_some_and(|c| c.is_ascii_alphanumeric()));
    // The word just before (`version 1.0.0.1`, `firmware: 4.2.0.17`).
    let lead = text
        .get(span.start.saturating_sub(24)..span.start)
        .unwrap_or_default();
    let previous_word = lead
        .split(|c: char| !c.is_ascii_alphanumeric())
        .rfind(|word| !word.is_empty())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let version_word = ["version", "ver", "v", "release", "build", "firmware", "rev"]
        .contains(&previous_word.as_str());
    (!longer && !version_mark && !version_word).then_some(span)
}

fn ipv6(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let glued_before =
        char_before(text, span.start).is_some_and(|c| word(c) || c == ':' || c == '.');
    let glued_after = char_at(text, span.end).is_some_and(|c| word(c) || c == ':');
    let groups = candidate
        .split(':')
        .filter(|group| !group.is_empty())
        .count();
    // `a::b`, `dead::beef` in code: real addresses (nearly) always have a digit.
    let digit = candidate.bytes().any(|b| b.is_ascii_digit());
    let parses = candidate.parse::<std::net::Ipv6Addr>().is_ok();
    (!glued_before && !glued_after && groups >= 2 && digit && parses).then_some(span)
}

/// Top-level domains that are file extensions: `icon@2x.png` is an asset, not an address.
const FILE_EXTENSIONS: [&str; 32] = [
    "png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "js", "mjs", "css", "ts", "tsx",
    "jsx", "py", "rs", "go", "java", "json", "yaml", "yml", "toml", "txt", "md", "html", "xml",
    "pdf", "zip", "gz", "tar", "lock", "csv",
];

fn email(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    let (local, domain) = candidate.rsplit_once('@')?;
    let tld = domain.rsplit('.').next()?.to_ascii_lowercase();
    if FILE_EXTENSIONS.contains(&tld.as_str()) || local.contains("..") || local.ends_with('.') {
        return None;
    }
    // `git@github.com:org/repo.git` is an SSH remote.
    let ssh_remote = char_at(text, span.end) == Some(':')
        && char_at(text, span.end + 1).is_some_and(|c| c.is_ascii_alphanumeric());
    (!ssh_remote).then_some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(String, &str)> {
        crate::guardrails::detector::found(&Pii::new(&[]).unwrap(), text)
    }

    #[test]
    fn each_kind_is_found_with_its_exact_span() {
        let cases = [
            (
                "write to jane.doe+news@example.co.uk today",
                "email",
                "jane.doe+news@example.co.uk",
            ),
            ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
            ("call (415) 555-2671.", "phone", "(415) 555-2671"),
            ("ring 020 7946 0958 please", "phone", "020 7946 0958"),
            (
                "card 4111 1111 1111 1111 exp",
                "card",
                "4111 1111 1111 1111",
            ),
            ("amex 378282246310005.", "card", "378282246310005"),
            ("ssn 219-09-9999 on file", "ssn", "219-09-9999"),
            (
                "iban DE89 3704 0044 0532 0130 00 ok",
                "iban",
                "DE89 3704 0044 0532 0130 00",
            ),
            (
                "iban GB82WEST12345698765432",
                "iban",
                "GB82WEST12345698765432",
            ),
            ("host 192.168.10.20 down", "ip", "192.168.10.20"),
            (
                "v6 2001:db8::8a2e:370:7334 up",
                "ip",
                "2001:db8::8a2e:370:7334",
            ),
        ];
        for (text, kind, span) in cases {
            assert_eq!(found(text), vec![(kind.to_owned(), span)], "{text}");
        }
    }

    #[test]
    fn look_alikes_are_not_matched() {
        let cases = [
            "card 4111 1111 1111 1112 (Luhn fails)",
            "ssn 000-12-3456 and 666-12-3456 and 900-12-3456",
            "iban DE89 3704 0044 0532 0130 01",
            "released 2024-01-15, version 1.2.3.4, v10.0.0.1",
            "uuid 123e4567-e89b-12d3-a456-426614174000",
            "isbn 978-3-16-148410-0",
            "asset icon@2x.png and git@github.com:org/repo.git",
            "time 12:30:45 and mac 00:1A:2B:3C:4D:5E",
            "std::io::Result and a::b",
            "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        ];
        for text in cases {
            assert_eq!(found(text), vec![], "{text}");
        }
    }

    #[test]
    fn kinds_can_be_chosen() {
        let only_email = Pii::new(&["email".into()]).unwrap();
        let mut hits = vec![];
        only_email.scan("a@b.example 4111111111111111", &mut hits);
        assert_eq!(hits.len(), 1);
        let err = Pii::new(&["passport".into()]).err().unwrap();
        assert!(err.contains("passport") && err.contains("email"), "{err}");
    }
}
