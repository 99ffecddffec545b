//! Turning chat messages into the prompt text a model was tuned on: the GGUF's own
//! `tokenizer.chat_template` (a Jinja template, rendered with minijinja) or a built-in ChatML.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// ChatML, what SmolLM2 and many instruction-tuned models use, for models without a template.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// The template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`); `bos` and `eos` are the token strings the
    /// template may refer to.
    pub fn new(source: Option<&str>, bos: &str, eos: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // Hugging Face templates call raise_exception on malformed conversations.
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_string())
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        t.render(context! {
            messages => messages.iter().map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])).collect::<Vec<_>>(),
            add_generation_prompt => true,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| TemplateError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let p = t
            .render(&[ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }])
            .unwrap();
        assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(Some("{{ raise_exception('no') }}"), "", "").unwrap();
        assert!(t.render(&[]).is_err());
    }
}
