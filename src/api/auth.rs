//! Bearer tokens: worker.yml lists each by the sha256 of its text, with a scope.

use sha2::{Digest, Sha256};

use crate::config::{ApiToken, Scope};

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer …`, or a token that is not listed: 401.
    Unauthenticated,
    /// A listed token whose scope is below what the request needs: 403 (its name, for
    /// the worker's log).
    Forbidden { name: String, has: Scope },
}

/// The tokens a worker accepts.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    listed: Vec<([u8; 32], ApiToken)>,
}

impl Tokens {
    pub fn new(tokens: &[ApiToken]) -> Self {
        let listed = tokens
            .iter()
            .filter_map(|t| Some((hex32(&t.sha256)?, t.clone())))
            .collect();
        Self { listed }
    }

    /// Checks the `Authorization` header's value against the listed tokens for `needed`.
    /// Every listed hash is compared, each in constant time, so the time taken says
    /// nothing about which (or how much of one) matched.
    pub fn check(&self, authorization: Option<&[u8]>, needed: Scope) -> Result<&str, Refusal> {
        let presented = authorization
            // The scheme's name is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| {
                let (scheme, token) = v.split_at_checked(7)?;
                scheme.eq_ignore_ascii_case(b"Bearer ").then_some(token)
            })
            .ok_or(Refusal::Unauthenticated)?;
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (hash, token) in &self.listed {
            if constant_time_eq(hash, &digest) {
                found = Some(token);
            }
        }
        let token = found.ok_or(Refusal::Unauthenticated)?;
        if token.scope >= needed {
            Ok(&token.name)
        } else {
            Err(Refusal::Forbidden {
                name: token.name.clone(),
                has: token.scope,
            })
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the fold from being turned into an early-exit comparison.
    std::hint::black_box(difference) == 0
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new random token (`qwt_` and 64 hex digits) and the sha256 that worker.yml lists.
pub fn new_token() -> std::io::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    let filled = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())?;
    if filled != bytes.len() {
        return Err(std::io::Error::other(
            "the kernel gave too few random bytes",
        ));
    }
    let token = format!("qwt_{}", hex(&bytes));
    let hash = hex(&Sha256::digest(token.as_bytes()));
    Ok((token, hash))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(token: &str, scope: Scope) -> ApiToken {
        ApiToken {
            name: format!("{scope:?}").to_lowercase(),
            sha256: hex(&Sha256::digest(token.as_bytes())),
            scope,
        }
    }

    #[test]
    fn a_token_passes_for_its_scope_and_those_below_only() {
        let tokens = Tokens::new(&[listed("r", Scope::Read), listed("s", Scope::Submit)]);
        assert_eq!(tokens.check(Some(b"Bearer r"), Scope::Read), Ok("read"));
        assert_eq!(tokens.check(Some(b"bearer r"), Scope::Read), Ok("read"));
        assert_eq!(tokens.check(Some(b"Bearer s"), Scope::Read), Ok("submit"));
        assert_eq!(tokens.check(Some(b"Bearer s"), Scope::Submit), Ok("submit"));
        assert_eq!(
            tokens.check(Some(b"Bearer r"), Scope::Submit),
            Err(Refusal::Forbidden {
                name: "read".into(),
                has: Scope::Read
            })
        );
        assert_eq!(
            tokens
                .check(Some(b"Bearer s"), Scope::Admin)
                .map_err(|e| matches!(e, Refusal::Forbidden { .. })),
            Err(true)
        );
        for wrong in [
            None,
            Some(&b"Bearer x"[..]),
            Some(b"r"),
            Some(b"Basic r"),
            Some(b"Bearer "),
        ] {
            assert_eq!(
                tokens.check(wrong, Scope::Read),
                Err(Refusal::Unauthenticated),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn new_tokens_differ_and_their_hash_lets_them_in() {
        let (a, hash) = new_token().expect("token");
        let (b, _) = new_token().expect("token");
        assert_ne!(a, b);
        assert!(a.starts_with("qwt_") && a.len() == 68, "{a}");
        let tokens = Tokens::new(&[ApiToken {
            name: "ci".into(),
            sha256: hash,
            scope: Scope::Admin,
        }]);
        assert_eq!(
            tokens.check(Some(format!("Bearer {a}").as_bytes()), Scope::Admin),
            Ok("ci")
        );
        assert_eq!(
            tokens.check(Some(format!("Bearer {b}").as_bytes()), Scope::Read),
            Err(Refusal::Unauthenticated)
        );
    }
}
