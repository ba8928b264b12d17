//! Admin API tokens (`[admin] tokens_file`): who may call the admin API, and in which role.
//!
//! The file holds, per token, a name (the actor in the audit log), a role, the owner it acts for
//! (the company whose devices it may see and change; the name when not given) and the SHA-256 of
//! the secret, never the secret itself: a copy of the file, or of a backup, lets nobody in. A
//! presented token is hashed and compared with every entry in constant time, so neither the
//! comparison nor which entry matched shows in the timing.
//!
//! ```toml
//! [[token]]
//! name = "operator"
//! role = "operator"
//! owner = "operator"
//! sha256 = "64 hex digits"
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use ring::digest::{digest, SHA256, SHA256_OUTPUT_LEN};
use serde::Deserialize;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: claims, profiles, status changes, rotation, transfer, release, the audit log.
    Operator,
    /// Lists and shows devices; submits activation plans.
    Technician,
}

impl Role {
    /// The name in the file and in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Technician => "technician",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "operator" => Ok(Self::Operator),
            "technician" => Ok(Self::Technician),
            other => Err(format!("unknown role {other:?} (operator or technician)")),
        }
    }
}

/// The longest owner name.
pub const MAX_OWNER: usize = 64;

/// Whether `owner` is a valid owner name: 1 to [`MAX_OWNER`] of `A-Z a-z 0-9 - _ .` (it appears
/// in URLs' bodies, the audit log and the store, never escaped).
pub fn is_valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= MAX_OWNER
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One accepted token: its holder's name, its role and the hash of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// The actor recorded in the audit log.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The owner it acts for: it sees and changes that owner's devices only.
    pub owner: String,
    sha256: [u8; SHA256_OUTPUT_LEN],
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// The tokens the admin API accepts. Empty: every request is refused.
#[derive(Clone, Debug, Default)]
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

/// Why the tokens file is unusable. Always the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file does not parse or an entry is invalid.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never a secret: the file holds none).
        why: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    role: Role,
    #[serde(default)]
    owner: Option<String>,
    sha256: String,
}

/// The length of a generated token's secret, in random bytes (hex-encoded on the wire).
pub const TOKEN_BYTES: usize = 32;

/// A plain token as handed to its holder once. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainToken(String);

impl PlainToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        let bytes: [u8; TOKEN_BYTES] = rand::random();
        Self(hex::encode(bytes))
    }

    /// The secret, for writing to its 0600 file or printing once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the secret, hex-encoded, as the tokens file stores it.
    pub fn sha256_hex(&self) -> String {
        hex::encode(digest(&SHA256, self.0.as_bytes()))
    }
}

impl fmt::Debug for PlainToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlainToken(<redacted>)")
    }
}

impl TokenSet {
    /// Reads and checks a tokens file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|why| TokenFileError::Invalid {
            path: path.to_owned(),
            why,
        })
    }

    /// Parses the text of a tokens file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.message().replace('\n', " "))?;
        let mut entries = Vec::with_capacity(raw.token.len());
        for t in raw.token {
            if t.name.trim().is_empty() || t.name.len() > 64 {
                return Err("a token name must have 1 to 64 characters".into());
            }
            if entries.iter().any(|e: &TokenEntry| e.name == t.name) {
                return Err(format!("token name {:?} appears twice", t.name));
            }
            let sha256 = hex::decode(t.sha256.trim())
                .ok()
                .and_then(|b| <[u8; SHA256_OUTPUT_LEN]>::try_from(b).ok())
                .ok_or_else(|| format!("token {:?}: sha256 must be 64 hex digits", t.name))?;
            let owner = match t.owner {
                Some(owner) if !is_valid_owner(&owner) => {
                    return Err(format!(
                        "token {:?}: owner must be 1 to {MAX_OWNER} of A-Z a-z 0-9 - _ .",
                        t.name
                    ))
                }
                Some(owner) => owner,
                None => t.name.clone(),
            };
            entries.push(TokenEntry {
                name: t.name,
                role: t.role,
                owner,
                sha256,
            });
        }
        Ok(Self { entries })
    }

    /// The text of a tokens file accepting `tokens` (name, role, owner, secret).
    pub fn file_text(tokens: &[(&str, Role, &str, &PlainToken)]) -> String {
        let mut out = String::from(
            "# Admin API tokens: SHA-256 of each secret, never the secret (docs/architecture.md).\n",
        );
        for (name, role, owner, token) in tokens {
            out.push_str(&Self::entry_text(name, *role, owner, token));
        }
        out
    }

    /// One `[[token]]` entry (with a leading blank line), to append to a tokens file. The name is
    /// written as a TOML string, escaped.
    pub fn entry_text(name: &str, role: Role, owner: &str, token: &PlainToken) -> String {
        format!(
            "\n[[token]]\nname = {}\nrole = \"{}\"\nowner = {}\nsha256 = \"{}\"\n",
            toml::Value::String(name.to_owned()),
            role.as_str(),
            toml::Value::String(owner.to_owned()),
            token.sha256_hex()
        )
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is accepted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry whose secret is `presented`, if any. Every entry is compared, in constant time.
    pub fn authenticate(&self, presented: &str) -> Option<&TokenEntry> {
        let hash = digest(&SHA256, presented.as_bytes());
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(&e.sha256, hash.as_ref()) {
                found = Some(e);
            }
        }
        found
    }
}

/// Compares two hashes without a data-dependent branch or early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_authentication() {
        let op = PlainToken::generate();
        let tech = PlainToken::generate();
        assert_ne!(op, tech);
        assert_eq!(op.expose().len(), TOKEN_BYTES * 2);
        let text = TokenSet::file_text(&[
            ("operator", Role::Operator, "operator", &op),
            ("technician", Role::Technician, "operator", &tech),
        ]);
        assert!(!text.contains(op.expose()) && !text.contains(tech.expose()));
        let set = TokenSet::parse(&text).expect("parse");
        assert_eq!(set.len(), 2);
        let e = set.authenticate(op.expose()).expect("operator");
        assert_eq!((e.name.as_str(), e.role), ("operator", Role::Operator));
        assert_eq!(e.owner, "operator");
        let e = set.authenticate(tech.expose()).expect("technician");
        assert_eq!(e.role, Role::Technician);
        assert_eq!(e.owner, "operator", "the technician works for the operator");
        assert!(set.authenticate("").is_none());
        assert!(set.authenticate(&op.expose()[1..]).is_none());
        assert!(!format!("{set:?} {op:?}").contains(op.expose()));
    }

    #[test]
    fn bad_files_are_refused() {
        for bad in [
            "[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"00\"\n",
            "[[token]]\nname = \"a\"\nrole = \"operator\"\nsha256 = \"00\"\n",
            "[[token]]\nname = \"a\"\nrole = \"operator\"\nsha256 = \"00\"\nextra = 1\n",
            "surprise = 1\n",
        ] {
            assert!(TokenSet::parse(bad).is_err(), "{bad}");
        }
        let h = "0".repeat(64);
        let dup = format!(
            "[[token]]\nname = \"a\"\nrole = \"operator\"\nsha256 = \"{h}\"\n[[token]]\nname = \"a\"\nrole = \"technician\"\nsha256 = \"{h}\"\n"
        );
        assert!(TokenSet::parse(&dup).is_err());
        assert!(TokenSet::parse("").expect("empty").is_empty());
        let bad_owner = format!(
            "[[token]]\nname = \"a\"\nrole = \"operator\"\nowner = \"a b\"\nsha256 = \"{h}\"\n"
        );
        assert!(TokenSet::parse(&bad_owner).is_err());
    }

    #[test]
    fn owner_defaults_to_the_name_and_entries_append() {
        let h = "0".repeat(64);
        let set = TokenSet::parse(&format!(
            "[[token]]\nname = \"acme\"\nrole = \"operator\"\nsha256 = \"{h}\"\n"
        ))
        .expect("parse");
        let t = PlainToken::generate();
        let mut text = TokenSet::file_text(&[("operator", Role::Operator, "operator", &t)]);
        let second = PlainToken::generate();
        text.push_str(&TokenSet::entry_text(
            "acme \"ops\"",
            Role::Operator,
            "acme",
            &second,
        ));
        let both = TokenSet::parse(&text).expect("parse appended");
        let e = both.authenticate(second.expose()).expect("second");
        assert_eq!(
            (e.name.as_str(), e.owner.as_str()),
            ("acme \"ops\"", "acme")
        );
        assert_eq!(set.entries[0].owner, "acme");
        assert_eq!("technician".parse::<Role>(), Ok(Role::Technician));
        assert!("admin".parse::<Role>().is_err());
        assert!(is_valid_owner("acme-1.x") && !is_valid_owner("") && !is_valid_owner("a/b"));
    }
}
