//! Bearer-token authentication for gRPC and REST, compared in constant time.

use std::sync::Arc;

use subtle::ConstantTimeEq;

/// The accepted tokens; none configured means authentication is off.
#[derive(Clone, Default)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Tokens from the configuration list and an optional file (one per line, `#` comments).
    pub fn load(listed: &[String], file: Option<&str>) -> Result<Self, crate::Error> {
        let mut tokens: Vec<Vec<u8>> = listed
            .iter()
            .map(|t| t.trim().as_bytes().to_vec())
            .filter(|t| !t.is_empty())
            .collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                crate::Error::Startup(format!("lookup.auth_tokens_file `{path}`: {e}"))
            })?;
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                if line.len() < 16 {
                    return Err(crate::Error::Startup(format!(
                        "lookup.auth_tokens_file `{path}`: a token is shorter than 16 characters"
                    )));
                }
                tokens.push(line.as_bytes().to_vec());
            }
        }
        Ok(Self(Arc::new(tokens)))
    }

    /// The tokens of `cfg` (see [`Tokens::load`]); with none, an error unless
    /// `allow_unauthenticated` is set: a reachable service refuses unauthenticated callers
    /// unless told otherwise. `service` names who asks, for the message.
    pub fn required(
        cfg: &leadscore_config::LookupConfig,
        service: &str,
    ) -> Result<Self, crate::Error> {
        let tokens = Self::load(&cfg.auth_tokens, cfg.auth_tokens_file.as_deref())?;
        if tokens.enabled() {
            return Ok(tokens);
        }
        if !cfg.allow_unauthenticated {
            return Err(crate::Error::Startup(format!(
                "{service}: no bearer token configured; set lookup.auth_tokens \
                 (LEADSCORE__LOOKUP__AUTH_TOKENS) or lookup.auth_tokens_file, or set \
                 lookup.allow_unauthenticated = true to serve every caller"
            )));
        }
        tracing::warn!(
            service,
            "lookup.allow_unauthenticated is set and no token is configured: every caller is served"
        );
        Ok(tokens)
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether an `authorization` header value carries an accepted token.
    /// Every configured token is compared, in constant time, whatever matches.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        if !self.enabled() {
            return true;
        }
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let mut ok = subtle::Choice::from(0u8);
        for t in self.0.iter() {
            ok |= t.as_slice().ct_eq(given);
        }
        ok.into()
    }
}

impl tonic::service::Interceptor for Tokens {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        if self.allows(header) {
            Ok(req)
        } else if header.is_none() {
            Err(tonic::Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ))
        } else {
            Err(tonic::Status::unauthenticated(
                "the bearer token is not accepted",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn only_a_configured_bearer_token_passes() {
        let t = Tokens::load(&["0123456789abcdef-one".into()], None).unwrap();
        assert!(t.allows(Some(b"Bearer 0123456789abcdef-one")));
        assert!(!t.allows(Some(b"Bearer 0123456789abcdef-on")));
        assert!(!t.allows(Some(b"Bearer 0123456789abcdef-one2")));
        assert!(!t.allows(Some(b"0123456789abcdef-one")));
        assert!(!t.allows(None));
        let open = Tokens::load(&[], None).unwrap();
        assert!(open.allows(None));
    }

    #[test]
    fn tokens_come_from_a_file_with_comments_and_short_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("tokens-{}", std::process::id()));
        std::fs::write(&dir, "# ops\n\nabcdefghijklmnop-file\n").unwrap();
        let t = Tokens::load(&[], Some(dir.to_str().unwrap())).unwrap();
        assert!(t.allows(Some(b"Bearer abcdefghijklmnop-file")));
        std::fs::write(&dir, "short\n").unwrap();
        let e = Tokens::load(&[], Some(dir.to_str().unwrap())).unwrap_err();
        assert!(e.to_string().contains("shorter than 16"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }
}
