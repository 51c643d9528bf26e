//! Chat prompts: the model's own HF Jinja `chat_template`, rendered the way
//! transformers' `apply_chat_template` renders it (jinja2 with
//! `trim_blocks` and `lstrip_blocks`, Python string methods such as
//! `.strip()`, and a `raise_exception` function).

use crate::error::{Error, Result};
use crate::model::{Model, Session, SessionOptions};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

/// One turn of a conversation, as chat templates see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A message with this role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled HF chat template.
///
/// ```
/// use nibble::{ChatTemplate, Message};
///
/// // SmolLM2's ChatML, shortened.
/// let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
///               {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// let t = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>")?;
/// let prompt = t.render(&[Message::new("user", "Hi!")], true)?;
/// assert_eq!(prompt, "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
/// // Template errors are errors, not panics.
/// assert!(ChatTemplate::new("{% if %}", "", "").is_err());
/// # Ok::<(), nibble::Error>(())
/// ```
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings the
    /// template sees under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers compiles templates with these jinja2 settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| Error::Template(one_line(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The template stored in the model file.
    pub fn from_model(model: &Model) -> Result<Self> {
        let source = model.chat_template().ok_or_else(|| {
            Error::Template(format!("{} has no chat template", model.path().display()))
        })?;
        let tok = model.tokenizer();
        Self::new(source, tok.bos_token(), tok.eos_token())
    }

    /// Renders the conversation; with `add_generation_prompt`, ends with the
    /// header of an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Template(one_line(&e)))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(one_line(&e)))
    }
}

/// A multi-turn conversation whose tokens stay in one session's KV cache.
/// Each turn re-renders the whole conversation with the template and feeds
/// only the tokens after the longest prefix already in the cache, so earlier
/// turns are never recomputed, and a template that renders past turns
/// differently (or a reply that re-tokenizes differently) is still correct.
pub struct Conversation<'m> {
    template: ChatTemplate,
    messages: Vec<Message>,
    session: Session<'m>,
}

impl<'m> Conversation<'m> {
    /// Starts a conversation (with an optional system message) over a new
    /// session; fails if the model has no chat template.
    pub fn new(model: &'m Model, system: Option<&str>, opts: SessionOptions) -> Result<Self> {
        Ok(Self {
            template: ChatTemplate::from_model(model)?,
            messages: system
                .map(|s| vec![Message::new("system", s)])
                .unwrap_or_default(),
            session: Session::new(model, opts)?,
        })
    }

    /// The turns so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The session holding the conversation's KV cache.
    pub fn session(&mut self) -> &mut Session<'m> {
        &mut self.session
    }

    /// Adds a user message and returns the tokens still to be fed (the
    /// session is rewound to the part of the rendered prompt it already
    /// holds). Pass them to [`generate`](fn@crate::generate), then call
    /// [`Conversation::add_reply`]. On error the message is not kept.
    pub fn user_turn(&mut self, text: &str) -> Result<Vec<u32>> {
        self.messages.push(Message::new("user", text));
        let ids = self
            .template
            .render(&self.messages, true)
            .and_then(|p| self.session.model().tokenizer().encode(&p, false));
        let ids = match ids {
            Ok(ids) if ids.len() > self.session.ctx() => Err(Error::ContextFull {
                ctx: self.session.ctx(),
                needed: ids.len(),
            }),
            Ok(ids) if ids.is_empty() => Err(Error::EmptyPrompt),
            other => other,
        };
        let ids = match ids {
            Ok(ids) => ids,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        let cached = self.session.tokens();
        let mut common = cached.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        // At least one token must be fed to get fresh logits.
        common = common.min(ids.len() - 1);
        self.session.truncate(common);
        Ok(ids[common..].to_vec())
    }

    /// Starts over with an empty conversation (and this system message, if
    /// any), keeping the session's KV cache allocation.
    pub fn reset(&mut self, system: Option<&str>) {
        self.messages = system
            .map(|s| vec![Message::new("system", s)])
            .unwrap_or_default();
        self.session.truncate(0);
    }

    /// Records the assistant's reply (the generated text, without EOS).
    pub fn add_reply(&mut self, text: &str) {
        self.messages.push(Message::new("assistant", text));
    }
}

/// minijinja errors carry a multi-line source excerpt in `{:#}`; the plain
/// form is one line, plus the detail if any.
fn one_line(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) if !e.to_string().contains(d) => format!("{e}: {d}"),
        _ => e.to_string(),
    }
    .replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn python_string_methods_and_block_trimming() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m.content.strip() }}|\n  {% endfor %}",
            "",
            "",
        )
        .unwrap();
        let out = t.render(&[Message::new("user", "  hi \n")], false).unwrap();
        // What jinja2 gives with trim_blocks + lstrip_blocks: the newline after
        // a block tag and the indentation before one go, other text stays.
        assert_eq!(out, "  hi|\n");
    }
}
