//! How a model reads examples: the one place that turns a prompt into the ids a model answers,
//! and an example into a training sample whose loss covers the model's answer only.
//!
//! - [`Format::Plain`], models trained from scratch on the byte tokenizer: BOS, the prompt's
//!   text, the response, EOS. A chat is written in ChatML as text (what `serve` does with these
//!   models' chat requests).
//! - [`Format::Chat`], a base model with a chat template (SmolLM2's ChatML, from its GGUF or
//!   `tokenizer_config.json`): a prompt/response pair is a user message and the assistant's
//!   answer; a chat is rendered whole, and the loss covers each assistant turn up to and
//!   including the token that ends it (`<|im_end|>`), so the model learns to stop (TRL's
//!   `assistant_only_loss`). The template decides the markup, including a default system
//!   message, so training sees exactly what `serve` will send the model.

use super::{DataError, Example, Prompt, Sample};
use crate::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use std::ops::Range;

/// How prompts and answers are laid out for a model.
pub enum Format {
    /// BOS, prompt text, response, EOS.
    Plain,
    /// The model's chat template.
    Chat {
        /// The compiled template.
        template: Box<ChatTemplate>,
        /// Tokens that end an assistant turn (EOS, `<|im_end|>`...).
        stops: Vec<u32>,
    },
}

/// The tokens that end a generation: EOS, and the usual end-of-turn control tokens the
/// vocabulary has.
pub fn stop_ids(tokenizer: &dyn Tokenizer) -> Vec<u32> {
    let mut stops: Vec<u32> = tokenizer.eos_id().into_iter().collect();
    for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
        let found = tokenizer
            .control_tokens()
            .iter()
            .find(|(text, _)| text == name);
        if let Some(&(_, id)) = found
            && !stops.contains(&id)
        {
            stops.push(id);
        }
    }
    stops
}

/// The text of the tokenizer's BOS and EOS tokens (what a template calls `bos_token`).
pub fn special_names(tokenizer: &dyn Tokenizer) -> (String, String) {
    let name = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_to_piece(i))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    (name(tokenizer.bos_id()), name(tokenizer.eos_id()))
}

fn template_err(e: impl std::fmt::Display) -> DataError {
    DataError::Kind(e.to_string())
}

impl Format {
    /// The format of a model with `template` (its chat template's source), or plain.
    pub fn new(tokenizer: &dyn Tokenizer, template: Option<&str>) -> Result<Self, DataError> {
        let Some(source) = template else {
            return Ok(Self::Plain);
        };
        let (bos, eos) = special_names(tokenizer);
        let template = ChatTemplate::new(Some(source), &bos, &eos).map_err(template_err)?;
        Ok(Self::Chat {
            template: Box::new(template),
            stops: stop_ids(tokenizer),
        })
    }

    /// The ids of `prompt`, ending where the model's answer begins.
    pub fn prompt_ids(
        &self,
        tokenizer: &dyn Tokenizer,
        prompt: &Prompt,
    ) -> Result<Vec<u32>, DataError> {
        match (self, prompt) {
            (Self::Plain, Prompt::Text(text)) => {
                let mut ids: Vec<u32> = tokenizer.bos_id().into_iter().collect();
                ids.extend(tokenizer.encode(text)?);
                Ok(ids)
            }
            (Self::Plain, Prompt::Messages(m)) => chatml_ids(tokenizer, m, true),
            (Self::Chat { template, .. }, p) => Ok(template
                .render(&p.messages())
                .map_err(template_err)?
                .encode(tokenizer)?),
        }
    }

    /// The training sample of `prompt` answered by `response`: the loss covers the answer and
    /// the token that ends it. `None` when nothing of the answer fits in `seq_len`.
    pub fn completion(
        &self,
        tokenizer: &dyn Tokenizer,
        prompt: &Prompt,
        response: &str,
        seq_len: usize,
    ) -> Result<Option<Sample>, DataError> {
        let sample = match (self, prompt) {
            (Self::Plain, Prompt::Text(text)) => {
                let mut tokens: Vec<u32> = tokenizer.bos_id().into_iter().collect();
                tokens.extend(tokenizer.encode(text)?);
                let loss_from = tokens.len();
                tokens.extend(tokenizer.encode(response)?);
                tokens.extend(tokenizer.eos_id());
                Sample::new(tokens, loss_from)
            }
            (_, p) => {
                let mut messages = p.messages();
                messages.push(ChatMessage::new("assistant", response));
                self.chat_sample(tokenizer, &messages)?
            }
        };
        Ok(fit(sample, seq_len))
    }

    /// The sft sample of `example`: a pair or a chat. `None` when no answer fits in `seq_len`.
    pub fn answer_sample(
        &self,
        tokenizer: &dyn Tokenizer,
        example: &Example,
        seq_len: usize,
    ) -> Result<Option<Sample>, DataError> {
        match example {
            Example::Pair { prompt, response } => {
                self.completion(tokenizer, &Prompt::Text(prompt.clone()), response, seq_len)
            }
            Example::Chat { messages } => {
                Ok(fit(self.chat_sample(tokenizer, messages)?, seq_len))
            }
            Example::Text { .. } => Err(DataError::Kind(
                "stage sft needs {\"prompt\", \"response\"} or {\"messages\": [...]} examples, found free text"
                    .into(),
            )),
            Example::Preference { .. } => Err(DataError::Kind(
                "a preference pair ({\"prompt\", \"chosen\", \"rejected\"}) is data for stage dpo, not sft"
                    .into(),
            )),
        }
    }

    /// The chosen and the rejected sample of a preference pair (`None` when either answer
    /// does not fit in `seq_len`).
    pub fn preference(
        &self,
        tokenizer: &dyn Tokenizer,
        example: &Example,
        seq_len: usize,
    ) -> Result<Option<(Sample, Sample)>, DataError> {
        let Example::Preference {
            prompt,
            chosen,
            rejected,
        } = example
        else {
            return Err(DataError::Kind(
                "stage dpo needs {\"prompt\", \"chosen\", \"rejected\"} examples".into(),
            ));
        };
        let chosen = self.completion(tokenizer, prompt, chosen, seq_len)?;
        let rejected = self.completion(tokenizer, prompt, rejected, seq_len)?;
        Ok(chosen.zip(rejected))
    }

    /// A whole conversation, the loss on its assistant turns.
    fn chat_sample(
        &self,
        tokenizer: &dyn Tokenizer,
        messages: &[ChatMessage],
    ) -> Result<Sample, DataError> {
        let render = |m: &[ChatMessage], open: bool| -> Result<Vec<u32>, DataError> {
            match self {
                Self::Plain => chatml_ids(tokenizer, m, open),
                Self::Chat { template, .. } => Ok(template
                    .render_with(m, open)
                    .map_err(template_err)?
                    .encode(tokenizer)?),
            }
        };
        let stops: &[u32] = match self {
            Self::Plain => &[],
            Self::Chat { stops, .. } => stops,
        };
        let tokens = render(messages, false)?;
        let mut loss: Vec<Range<usize>> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let start = render(&messages[..i], true)?;
            let end = render(&messages[..=i], false)?;
            if !(end.starts_with(&start) && tokens.starts_with(&end)) {
                return Err(DataError::Kind(format!(
                    "the chat template does not write message {i} (assistant) after the ones before it \
                     as they are written alone, so its answer cannot be told apart; \
                     a conversation should start with a system or user message"
                )));
            }
            // The answer ends with the first token that ends a turn, included.
            let stop = end[start.len()..]
                .iter()
                .position(|t| stops.contains(t))
                .map_or(end.len(), |p| start.len() + p + 1);
            loss.push(start.len().max(1)..stop);
        }
        if loss.is_empty() {
            return Err(DataError::Kind(
                "a chat example needs at least one assistant message to learn from".into(),
            ));
        }
        Ok(Sample { tokens, loss })
    }
}

/// ChatML as text for a tokenizer without control tokens (the byte tokenizer).
fn chatml_ids(
    tokenizer: &dyn Tokenizer,
    messages: &[ChatMessage],
    open: bool,
) -> Result<Vec<u32>, DataError> {
    let template = ChatTemplate::new(None, "", "").map_err(template_err)?;
    Ok(template
        .render_with(messages, open)
        .map_err(template_err)?
        .encode(tokenizer)?)
}

/// `sample` cut to `seq_len + 1` tokens, or `None` when no prediction that counts is left.
fn fit(mut sample: Sample, seq_len: usize) -> Option<Sample> {
    sample.truncate(seq_len + 1);
    (sample.n_counted() > 0).then_some(sample)
}
