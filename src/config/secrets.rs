//! Secrets: the JWT secret, the publish token and the authorization hook's
//! signing secret come from the environment
//! or from a file named by a `_FILE` variable or flag, never from a flag's
//! value (it would show in `ps`), and stay wrapped so that they cannot be
//! printed.

use std::path::Path;

use secrecy::SecretString;

use super::{Config, ConfigError};

/// Shortest HS256 secret production accepts (RFC 7518: a key as long as the hash).
pub const MIN_JWT_SECRET: usize = 32;
/// Shortest publish token production accepts.
pub const MIN_PUBLISH_TOKEN: usize = 16;

fn read_secret_file(what: &'static str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ConfigError::Empty(what));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// Resolves one secret from its variable's value and its file.
fn resolve_secret(
    what: &'static str,
    value: Option<String>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, ConfigError> {
    match (value.filter(|v| !v.is_empty()), file) {
        (Some(_), Some(_)) => Err(ConfigError::Both(what)),
        (Some(v), None) => Ok(Some(SecretString::from(v))),
        (None, Some(path)) => read_secret_file(what, path).map(Some),
        (None, None) => Ok(None),
    }
}

impl Config {
    /// Reads the secrets from the process environment and the `_FILE` settings.
    pub fn load_secrets(&mut self) -> Result<(), ConfigError> {
        self.auth.jwt_secret = resolve_secret(
            "HERALD_JWT_SECRET",
            std::env::var("HERALD_JWT_SECRET").ok(),
            self.auth.jwt_secret_file.as_deref(),
        )?;
        self.publish.publish_token = resolve_secret(
            "HERALD_PUBLISH_TOKEN",
            std::env::var("HERALD_PUBLISH_TOKEN").ok(),
            self.publish.publish_token_file.as_deref(),
        )?;
        self.access.access_secret = resolve_secret(
            "HERALD_ACCESS_SECRET",
            std::env::var("HERALD_ACCESS_SECRET").ok(),
            self.access.access_secret_file.as_deref(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_secret_is_read_from_its_file_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        let secret = resolve_secret("X", None, Some(&path)).unwrap().unwrap();
        assert_eq!(secret.expose_secret(), "s3cret");
        assert!(matches!(resolve_secret("X", Some("a".into()), Some(&path)), Err(ConfigError::Both(_))));
    }
}
