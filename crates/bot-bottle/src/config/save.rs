//! `bot-bottle approve --save`: an approved rule written into the user's own manifest of the
//! bottle, in place (its comments, order and layout kept), so the next start allows it too.
//! Never into a bundled manifest (or one shipped in a repository): only a file in the user's
//! bottle directory is edited.

use std::path::{Path, PathBuf};

use super::manifest::{self, ManifestSource};

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(
        "bottle `{name}` is bundled with bot-bottle, and approvals are never saved into a bundled \
         manifest: make your own, {dir}/my-{name}.toml with `extends = \"{name}\"`, and start \
         that (this approval holds for this session)",
        dir = user_dir.display()
    )]
    Bundled { name: String, user_dir: PathBuf },
    #[error("no manifest of bottle `{name}` in {} to save the rule into", user_dir.display())]
    NotFound { name: String, user_dir: PathBuf },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a manifest bot-bottle can edit: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `[egress] allow` must be an array to add {rule:?} to it")]
    NotAnArray { path: PathBuf, rule: String },
    #[error("writing {path} (the manifest is unchanged)")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("with {rule:?} added, {path} would no longer load (it is unchanged)")]
    Invalid {
        path: PathBuf,
        rule: String,
        #[source]
        source: Box<manifest::ManifestError>,
    },
}

/// Adds `rule` to `[egress] allow` of the user's manifest `name`; returns the file edited (or
/// left as it was when the rule was there already).
pub fn save_allow_rule(
    source: &ManifestSource,
    name: &str,
    rule: &str,
) -> Result<PathBuf, SaveError> {
    let path = source.user_path(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bundled = manifest::BUNDLED.iter().any(|(n, _)| *n == name);
            let user_dir = source.user_dir.clone();
            let name = name.to_owned();
            return Err(match bundled {
                true => SaveError::Bundled { name, user_dir },
                false => SaveError::NotFound { name, user_dir },
            });
        }
        Err(source) => return Err(SaveError::Read { path, source }),
    };
    let edited = with_rule(&path, &text, rule)?;
    if edited == text {
        return Ok(path);
    }
    // The edited manifest must still load (with its `extends`) before it replaces the file.
    source
        .load_edited(name, &edited)
        .map_err(|e| SaveError::Invalid {
            path: path.clone(),
            rule: rule.to_owned(),
            source: Box::new(e),
        })?;
    // Written beside, then renamed over: a crash leaves the old file or the new, never half.
    let temp = path.with_extension("toml.saving");
    std::fs::write(&temp, &edited)
        .and_then(|()| std::fs::rename(&temp, &path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&temp);
            SaveError::Write {
                path: path.clone(),
                source,
            }
        })?;
    Ok(path)
}

/// `text` with `rule` in `[egress] allow` (created when missing; unchanged when present).
fn with_rule(path: &Path, text: &str, rule: &str) -> Result<String, SaveError> {
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| SaveError::Parse {
                path: path.to_path_buf(),
                message: e.to_string().trim_end().to_owned(),
            })?;
    let egress = doc
        .entry("egress")
        .or_insert_with(toml_edit::table)
        .as_table_like_mut()
        .ok_or_else(|| SaveError::Parse {
            path: path.to_path_buf(),
            message: "`egress` is not a table".into(),
        })?;
    let allow = egress
        .entry("allow")
        .or_insert(toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| SaveError::NotAnArray {
            path: path.to_path_buf(),
            rule: rule.to_owned(),
        })?;
    if !allow.iter().any(|v| v.as_str() == Some(rule)) {
        allow.push(rule);
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path) -> ManifestSource {
        ManifestSource::new(dir.to_path_buf())
    }

    #[test]
    fn the_rule_is_added_to_the_users_manifest_keeping_its_comments_and_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        let text =
            "# my bottle\nextends = \"test\"\n\n[egress]\n# the API\nallow = [\"api.test\"]\n";
        std::fs::write(&path, text).unwrap();

        let saved = save_allow_rule(&source(dir.path()), "mine", "new.test:8443").unwrap();

        assert_eq!(saved, path);
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.starts_with("# my bottle\n"), "{after}");
        assert!(after.contains("# the API\n"), "{after}");
        let loaded = source(dir.path()).load("mine").unwrap();
        assert!(loaded.egress.allow.contains(&"new.test:8443".to_owned()));
        assert!(loaded.egress.allow.contains(&"api.test".to_owned()));
        // Saving again changes nothing.
        save_allow_rule(&source(dir.path()), "mine", "new.test:8443").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), after);
    }

    #[test]
    fn a_manifest_without_egress_gets_the_table() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.toml"), "extends = \"test\"\n").unwrap();
        save_allow_rule(&source(dir.path()), "mine", "new.test:443").unwrap();
        let loaded = source(dir.path()).load("mine").unwrap();
        assert!(loaded.egress.allow.contains(&"new.test:443".to_owned()));
    }

    #[test]
    fn a_bundled_manifest_is_never_edited_and_the_error_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = save_allow_rule(&source(dir.path()), "test", "new.test:443").unwrap_err();
        assert!(matches!(err, SaveError::Bundled { .. }), "{err:?}");
        assert!(err.to_string().contains("extends = \"test\""), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_rule_that_would_break_the_manifest_leaves_it_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        let text = "extends = \"test\"\n[egress]\ndeny = [\"new.test\"]\n";
        std::fs::write(&path, text).unwrap();
        let err = save_allow_rule(&source(dir.path()), "mine", "http://new.test/").unwrap_err();
        assert!(matches!(err, SaveError::Invalid { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
