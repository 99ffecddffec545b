//! Reading examples from a data URI.

use super::{DataError, Example, Prompt, builtin};
use crate::tokenizer::ChatMessage;
use std::path::{Path, PathBuf};

/// Where `pvc://CLAIM/PATH` URIs are mounted: `$ANNEAL_PVC_ROOT/CLAIM/PATH` (default `/mnt/pvc`),
/// the layout the operator uses when it mounts a claim into a pod.
pub use anneal_crds::common::DatasetFormat;

const PVC_ROOT_ENV: &str = "ANNEAL_PVC_ROOT";

/// The local path a `file://` or `pvc://` URI (or a plain path) points at; `None` for `builtin:`.
pub fn resolve_path(uri: &str) -> Result<Option<PathBuf>, DataError> {
    if uri.starts_with("builtin:") {
        return Ok(None);
    }
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(Some(PathBuf::from(rest)));
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let root =
            std::env::var(PVC_ROOT_ENV).unwrap_or_else(|_| anneal_crds::contract::PVC_ROOT.into());
        if rest.is_empty() || rest.split('/').any(|c| c == "..") {
            return Err(DataError::Scheme(uri.into()));
        }
        return Ok(Some(Path::new(&root).join(rest)));
    }
    if uri.contains("://") || uri.is_empty() {
        return Err(DataError::Scheme(uri.into()));
    }
    Ok(Some(PathBuf::from(uri)))
}

/// All examples behind `uri`, in file order; the format follows the file name.
pub fn load(uri: &str) -> Result<Vec<Example>, DataError> {
    load_as(uri, DatasetFormat::Auto)
}

/// All examples behind `uri`, in file order, read as `format` (`Auto`: from the file name).
pub fn load_as(uri: &str, format: DatasetFormat) -> Result<Vec<Example>, DataError> {
    let examples = match resolve_path(uri)? {
        None => builtin::load(uri.trim_start_matches("builtin:"))?,
        Some(path) => load_file(&path, format)?,
    };
    if examples.is_empty() {
        return Err(DataError::Empty(uri.into()));
    }
    Ok(examples)
}

fn load_file(path: &Path, format: DatasetFormat) -> Result<Vec<Example>, DataError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: shown.clone(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::Malformed {
        path: shown.clone(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        msg: "not valid UTF-8".into(),
    })?;
    let is_jsonl = match format {
        DatasetFormat::Jsonl => true,
        DatasetFormat::Text => false,
        DatasetFormat::Auto => matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("jsonl" | "ndjson")
        ),
    };
    if is_jsonl {
        parse_jsonl(&text, &shown)
    } else {
        Ok(parse_text(&text))
    }
}

/// A plain text file: each paragraph (separated by a blank line) is one example.
fn parse_text(text: &str) -> Vec<Example> {
    text.split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| Example::Text {
            text: p.to_string(),
        })
        .collect()
}

/// What one JSON line may hold.
const KINDS: &str = "expected {\"text\": string}, {\"prompt\": string, \"response\": string}, \
{\"messages\": [{\"role\", \"content\"}...]} or {\"prompt\", \"chosen\": string, \"rejected\": string}";

/// JSON lines of `{"text"}`, `{"prompt", "response"}`, `{"messages": [...]}` (a chat) or
/// `{"prompt", "chosen", "rejected"}` (a preference pair; the prompt may be messages, and each
/// answer a string or a list holding one assistant message, as TRL's conversational format).
fn parse_jsonl(text: &str, path: &str) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |msg: String| DataError::Malformed {
            path: path.into(),
            line: i + 1,
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
        out.push(example(&value).map_err(malformed)?);
    }
    Ok(out)
}

/// The example one JSON value holds.
fn example(value: &serde_json::Value) -> Result<Example, String> {
    let has = |name: &str| value.get(name).is_some();
    let string = |name: &str| -> Result<String, String> {
        value[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("\"{name}\" must be a string"))
    };
    let messages = |name: &str, v: &serde_json::Value| -> Result<Vec<ChatMessage>, String> {
        let list: Vec<ChatMessage> = serde_json::from_value(v.clone()).map_err(|e| {
            format!("\"{name}\" must be a list of {{\"role\": string, \"content\": string}}: {e}")
        })?;
        if let Some(m) = list.iter().find(|m| m.role.trim().is_empty()) {
            return Err(format!(
                "\"{name}\" has a message without a role: {:?}",
                m.content
            ));
        }
        Ok(list)
    };
    if has("messages") {
        let messages = messages("messages", &value["messages"])?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("\"messages\" has no assistant message to learn from".into());
        }
        return Ok(Example::Chat { messages });
    }
    if has("chosen") || has("rejected") {
        let prompt = match &value["prompt"] {
            serde_json::Value::String(s) => Prompt::Text(s.clone()),
            serde_json::Value::Null => {
                return Err(format!("a preference pair needs \"prompt\"; {KINDS}"));
            }
            v => Prompt::Messages(messages("prompt", v)?),
        };
        let answer = |name: &str| -> Result<String, String> {
            match &value[name] {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Null => Err(format!("a preference pair needs \"{name}\"")),
                v => match messages(name, v)?.as_slice() {
                    [m] if m.role == "assistant" => Ok(m.content.clone()),
                    _ => Err(format!(
                        "\"{name}\" must be a string or a list of one assistant message"
                    )),
                },
            }
        };
        return Ok(Example::Preference {
            prompt,
            chosen: answer("chosen")?,
            rejected: answer("rejected")?,
        });
    }
    match (has("prompt"), has("response"), has("text")) {
        (true, true, _) => Ok(Example::Pair {
            prompt: string("prompt")?,
            response: string("response")?,
        }),
        (false, false, true) => Ok(Example::Text {
            text: string("text")?,
        }),
        _ => Err(KINDS.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert!(matches!(
            resolve_path("s3://bucket/x"),
            Err(DataError::Scheme(_))
        ));
        assert_eq!(
            resolve_path("file:///a/b").unwrap(),
            Some(PathBuf::from("/a/b"))
        );
        assert!(resolve_path("pvc://claim/../etc").is_err());
        assert_eq!(resolve_path("builtin:arith").unwrap(), None);
    }

    #[test]
    fn jsonl() {
        let ok = parse_jsonl(
            "{\"prompt\":\"1+1=\",\"response\":\"2\"}\n\n{\"text\":\"hi\"}\n",
            "f",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let err = parse_jsonl("{\"text\":\"a\"}\n{oops\n", "f").unwrap_err();
        assert!(err.to_string().starts_with("f:2: invalid JSON"), "{err}");
        assert!(parse_jsonl("{\"prompt\":\"a\"}\n", "f").is_err());
    }

    #[test]
    fn chats_and_preference_pairs() {
        let ok = parse_jsonl(
            concat!(
                r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
                "\n",
                r#"{"prompt":"2+2?","chosen":"4","rejected":"5"}"#,
                "\n",
                r#"{"prompt":[{"role":"user","content":"2+2?"}],"chosen":[{"role":"assistant","content":"4"}],"rejected":"5"}"#,
            ),
            "f",
        )
        .unwrap();
        assert!(matches!(&ok[0], Example::Chat { messages } if messages.len() == 2));
        assert!(
            matches!(&ok[1], Example::Preference { prompt: Prompt::Text(p), chosen, .. } if p == "2+2?" && chosen == "4")
        );
        assert!(
            matches!(&ok[2], Example::Preference { prompt: Prompt::Messages(m), .. } if m.len() == 1)
        );
        let err = parse_jsonl(
            "{\"text\":\"a\"}\n{\"prompt\":\"p\",\"chosen\":\"a\"}\n",
            "f",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "f:2: a preference pair needs \"rejected\"");
        let err = parse_jsonl(
            "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n",
            "f",
        )
        .unwrap_err();
        assert!(err.to_string().contains("no assistant message"), "{err}");
    }
}
