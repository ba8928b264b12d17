//! The two CSV files of the device lifecycle: the manufacturer's shipping manifest (an owner
//! claims the devices in it) and the technician's activation plan (the devices in it are active
//! at their first contact).
//!
//! ```text
//! serial,factory_public_key,model          serial,account,profile
//! meter-00001,<64 hex digits>,EM-1         meter-00001,apt-12,default
//! ```
//!
//! A file is validated as a whole: every bad row is named by its line number in the file (the
//! header is line 1), and the store commits nothing unless every row is good
//! (`Store::claim`, `Store::activate` add the checks that need
//! the database). Fields are separated by commas and trimmed; quoting is not supported (no field
//! may hold a comma); blank lines are skipped.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use relay_protocol::session::PublicKey;

use crate::release::is_valid_model;

/// The most rows a manifest or a plan may have.
pub const MAX_ROWS: usize = 100_000;
/// The longest serial accepted.
pub const MAX_SERIAL: usize = 64;
/// The longest account accepted.
pub const MAX_ACCOUNT: usize = 64;
/// The longest profile name accepted.
pub const MAX_PROFILE_NAME: usize = 32;
/// The manifest's header.
pub const MANIFEST_HEADER: [&str; 3] = ["serial", "factory_public_key", "model"];
/// The plan's header.
pub const PLAN_HEADER: [&str; 3] = ["serial", "account", "profile"];

/// One bad row of a manifest or a plan.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    /// Its line number in the file (the header is line 1).
    pub row: usize,
    /// Its serial, when it has one.
    pub serial: Option<String>,
    /// What is wrong with it.
    pub error: String,
}

impl RowError {
    pub(crate) fn new(row: usize, serial: Option<&str>, error: impl Into<String>) -> Self {
        Self {
            row,
            serial: serial.map(str::to_owned),
            error: error.into(),
        }
    }
}

/// A file parsed: the good rows, and every bad row (the store adds its own checks to these and
/// commits only when there are none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed<T> {
    /// The rows that parsed.
    pub rows: Vec<T>,
    /// The rows that did not, in file order.
    pub errors: Vec<RowError>,
}

/// One row of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRow {
    /// Its line number.
    pub row: usize,
    /// The device's serial number.
    pub serial: String,
    /// Its factory public key.
    pub factory_key: PublicKey,
    /// Its model.
    pub model: String,
}

/// One row of an activation plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRow {
    /// Its line number.
    pub row: usize,
    /// The device's serial number.
    pub serial: String,
    /// The customer account (an apartment number, …); empty is none.
    pub account: Option<String>,
    /// The profile the device gets.
    pub profile: String,
}

/// Whether `s` is a serial: 1 to [`MAX_SERIAL`] of `A-Z a-z 0-9 - _ .`.
pub fn is_valid_serial(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SERIAL
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `s` is a profile name: 1 to [`MAX_PROFILE_NAME`] of `A-Z a-z 0-9 - _ .`.
pub fn is_valid_profile_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PROFILE_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `s` is an account: 1 to [`MAX_ACCOUNT`] printable ASCII characters, no comma.
pub fn is_valid_account(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ACCOUNT
        && s.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b',' && b != b'"')
}

/// The data lines of a CSV file with `header`: `(line number, fields)`, or the errors that stop
/// the file from being read at all (no header, too many rows).
fn records<'a>(
    text: &'a [u8],
    header: &[&str; 3],
    errors: &mut Vec<RowError>,
) -> Vec<(usize, Vec<&'a str>)> {
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let mut lines = (1..).zip(text.split(|b| *b == b'\n'));
    let want = header.join(",");
    let head = lines
        .next()
        .and_then(|(_, l)| std::str::from_utf8(l).ok())
        .map(|l| {
            l.split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        });
    if head.as_deref() != Some(&header.map(str::to_owned)[..]) {
        errors.push(RowError::new(1, None, format!("the header must be {want}")));
        return Vec::new();
    }
    let mut out = Vec::new();
    for (n, raw) in lines {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == MAX_ROWS {
            errors.push(RowError::new(n, None, format!("more than {MAX_ROWS} rows")));
            return out;
        }
        let Ok(line) = std::str::from_utf8(raw) else {
            errors.push(RowError::new(n, None, "not UTF-8"));
            continue;
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let serial = fields.first().copied().filter(|s| is_valid_serial(s));
        if line.contains('"') {
            errors.push(RowError::new(n, serial, "quoted fields are not supported"));
        } else if fields.len() != 3 {
            errors.push(RowError::new(
                n,
                serial,
                format!("expected 3 fields ({want}), found {}", fields.len()),
            ));
        } else {
            out.push((n, fields));
        }
    }
    if out.is_empty() && errors.is_empty() {
        errors.push(RowError::new(1, None, "no rows after the header"));
    }
    out
}

/// Checks the serial of row `n` and that it did not appear before.
fn check_serial(n: usize, serial: &str, seen: &mut HashMap<String, usize>) -> Result<(), RowError> {
    if !is_valid_serial(serial) {
        return Err(RowError::new(
            n,
            None,
            format!("serial {serial:?}: 1 to {MAX_SERIAL} of A-Z a-z 0-9 - _ ."),
        ));
    }
    match seen.entry(serial.to_owned()) {
        Entry::Occupied(first) => Err(RowError::new(
            n,
            Some(serial),
            format!("duplicate serial (first on row {})", first.get()),
        )),
        Entry::Vacant(v) => {
            v.insert(n);
            Ok(())
        }
    }
}

/// Parses a shipping manifest (`serial,factory_public_key,model`).
pub fn parse_manifest(text: &[u8]) -> Parsed<ManifestRow> {
    let mut errors = Vec::new();
    let records = records(text, &MANIFEST_HEADER, &mut errors);
    let mut rows = Vec::with_capacity(records.len());
    let mut serials = HashMap::new();
    let mut keys: HashMap<PublicKey, usize> = HashMap::new();
    for (n, f) in records {
        let (serial, key, model) = (f[0], f[1], f[2]);
        if let Err(e) = check_serial(n, serial, &mut serials) {
            errors.push(e);
            continue;
        }
        let factory_key = match PublicKey::from_hex(key) {
            Ok(k) if k.0 != [0; 32] => k,
            Ok(_) => {
                errors.push(RowError::new(n, Some(serial), "the all-zero key"));
                continue;
            }
            Err(_) => {
                errors.push(RowError::new(
                    n,
                    Some(serial),
                    "factory_public_key: 64 hex digits",
                ));
                continue;
            }
        };
        if !is_valid_model(model) {
            errors.push(RowError::new(
                n,
                Some(serial),
                "model: 1 to 64 printable ASCII characters",
            ));
            continue;
        }
        if let Some(first) = keys.get(&factory_key) {
            errors.push(RowError::new(
                n,
                Some(serial),
                format!("duplicate factory key (first on row {first})"),
            ));
            continue;
        }
        keys.insert(factory_key, n);
        rows.push(ManifestRow {
            row: n,
            serial: serial.to_owned(),
            factory_key,
            model: model.to_owned(),
        });
    }
    errors.sort_by_key(|e| e.row);
    Parsed { rows, errors }
}

/// Parses an activation plan (`serial,account,profile`).
pub fn parse_plan(text: &[u8]) -> Parsed<PlanRow> {
    let mut errors = Vec::new();
    let records = records(text, &PLAN_HEADER, &mut errors);
    let mut rows = Vec::with_capacity(records.len());
    let mut serials = HashMap::new();
    for (n, f) in records {
        let (serial, account, profile) = (f[0], f[1], f[2]);
        if let Err(e) = check_serial(n, serial, &mut serials) {
            errors.push(e);
            continue;
        }
        if !account.is_empty() && !is_valid_account(account) {
            errors.push(RowError::new(
                n,
                Some(serial),
                format!("account: at most {MAX_ACCOUNT} printable ASCII characters"),
            ));
            continue;
        }
        if !is_valid_profile_name(profile) {
            errors.push(RowError::new(
                n,
                Some(serial),
                format!("profile {profile:?}: 1 to {MAX_PROFILE_NAME} of A-Z a-z 0-9 - _ ."),
            ));
            continue;
        }
        rows.push(PlanRow {
            row: n,
            serial: serial.to_owned(),
            account: (!account.is_empty()).then(|| account.to_owned()),
            profile: profile.to_owned(),
        });
    }
    errors.sort_by_key(|e| e.row);
    Parsed { rows, errors }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_hex(n: u8) -> String {
        hex::encode([n; 32])
    }

    #[test]
    fn a_good_manifest_parses() {
        let text = format!(
            "\u{feff}Serial, factory_public_key ,model\r\nm-1,{},EM-1\r\n\r\nm-2 , {} , EM 2 rev b\n",
            key_hex(1),
            key_hex(2)
        );
        let p = parse_manifest(text.as_bytes());
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.rows.len(), 2);
        assert_eq!(
            (
                p.rows[1].row,
                p.rows[1].serial.as_str(),
                p.rows[1].model.as_str()
            ),
            (4, "m-2", "EM 2 rev b")
        );
        assert_eq!(p.rows[0].factory_key, PublicKey([1; 32]));
    }

    #[test]
    fn every_bad_manifest_row_is_named() {
        let text = format!(
            "serial,factory_public_key,model\n\
             m-1,{k1},EM\n\
             bad serial,{k2},EM\n\
             m-3,abcd,EM\n\
             m-1,{k3},EM\n\
             m-5,{k1},EM\n\
             m-6,{k4}\n\
             m-7,{k5},\n\
             m-8,{zero},EM\n\
             m-9,\"{k6}\",EM\n",
            k1 = key_hex(1),
            k2 = key_hex(2),
            k3 = key_hex(3),
            k4 = key_hex(4),
            k5 = key_hex(5),
            k6 = key_hex(6),
            zero = key_hex(0),
        );
        let p = parse_manifest(text.as_bytes());
        let rows: Vec<usize> = p.errors.iter().map(|e| e.row).collect();
        assert_eq!(rows, [3, 4, 5, 6, 7, 8, 9, 10], "{:?}", p.errors);
        assert!(p.errors[2].error.contains("first on row 2"));
        assert!(p.errors[3].error.contains("duplicate factory key"));
        assert_eq!(p.errors[1].serial.as_deref(), Some("m-3"));
        assert_eq!(p.rows.len(), 1);
    }

    #[test]
    fn files_that_cannot_be_read_at_all() {
        for (text, row, what) in [
            ("", 1, "header"),
            ("serial,model\nx,y\n", 1, "header"),
            ("serial,factory_public_key,model\n", 1, "no rows"),
            ("serial,factory_public_key,model\n\n  \n", 1, "no rows"),
        ] {
            let p = parse_manifest(text.as_bytes());
            assert_eq!(p.errors.len(), 1, "{text:?}");
            assert_eq!(p.errors[0].row, row);
            assert!(p.errors[0].error.contains(what), "{:?}", p.errors);
        }
        let mut big = String::from("serial,account,profile\n");
        for i in 0..=MAX_ROWS {
            big.push_str(&format!("m-{i},,default\n"));
        }
        let p = parse_plan(big.as_bytes());
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].row, MAX_ROWS + 2);
        assert!(p.errors[0].error.contains("more than"));
        let p = parse_plan(b"serial,account,profile\nm-1,\xff,default\n");
        assert_eq!(p.errors[0].row, 2);
    }

    #[test]
    fn plans_parse_and_bad_rows_are_named() {
        let p = parse_plan(
            b"serial,account,profile\nm-1,apt 12,default\nm-2,,heat\nm-1,x,default\nm-4,a,bad profile\nm-5,a\n",
        );
        assert_eq!(p.rows.len(), 2);
        assert_eq!(p.rows[0].account.as_deref(), Some("apt 12"));
        assert_eq!(p.rows[1].account, None);
        let rows: Vec<usize> = p.errors.iter().map(|e| e.row).collect();
        assert_eq!(rows, [4, 5, 6]);
    }
}
