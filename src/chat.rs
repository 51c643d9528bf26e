//! Chat prompts: the model's own HF Jinja `chat_template`, rendered the way
//! transformers' `apply_chat_template` renders it (jinja2 with
//! `trim_blocks` and `lstrip_blocks`, Python string methods such as
//! `.strip()`, and a `raise_exception` function).
//!
//! The template comes from the model file, so it is not trusted to be sane:
//! a render may run at most [`RENDER_FUEL`] template instructions and write
//! at most 1 MiB plus four times the conversation's own bytes; past either it
//! fails with "chat template: exceeded its budget ..." instead of looping or
//! growing forever (minijinja also bounds recursion, `range` and string
//! repetition itself).
//!
//! Special tokens: [`ChatTemplate::render`] followed by
//! [`Tokenizer::encode`] (what `nibble chat` and [`Conversation`] do, and
//! what transformers does) reads special-token text such as `<|im_start|>`
//! as the control token wherever it appears, message contents included. That
//! is right for a local user typing at their own model, but not across a
//! trust boundary: [`ChatTemplate::encode_untrusted`], which `nibble serve`
//! uses, keeps special-token text inside message contents as plain text and
//! refuses it in roles.

use crate::error::{Error, Result};
use crate::model::{Model, Session, SessionOptions};
use crate::tokenizer::Tokenizer;
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;
use std::ops::Range;

/// Template instructions one render may execute (minijinja's fuel). SmolLM2's
/// ChatML template spends about 23 per message and LLaMA-2's about 45
/// (measured on 20 000 turns), so this admits conversations of some 400 000
/// messages, far past any context, and stops a runaway template within a
/// fraction of a second.
pub const RENDER_FUEL: u64 = 20_000_000;

/// Rendered output allowed whatever the conversation's size.
const RENDER_BASE_BYTES: usize = 1 << 20;

/// What a render that ran out of [`RENDER_FUEL`] or output room reports,
/// after "chat template: ".
pub const BUDGET_EXCEEDED: &str = "exceeded its budget";

/// Marks the start and end of a message's content in a probe render
/// (private-use code points of plane 15, which no tokenizer gives meaning).
const OPEN: char = '\u{F0000}';
const CLOSE: char = '\u{F0001}';

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
        env.set_fuel(Some(RENDER_FUEL));
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
    ///
    /// Fails with a "chat template: exceeded its budget" error when the
    /// template runs more than [`RENDER_FUEL`] instructions or writes more
    /// than 1 MiB plus four times the bytes of the messages.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Template(one_line(&e)))?;
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        let limit = RENDER_BASE_BYTES.saturating_add(input.saturating_mul(4));
        let mut out = CappedWriter {
            buf: Vec::new(),
            limit,
        };
        let rendered = tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| Error::Template("rendered invalid UTF-8 (a bug in nibble)".into())),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::Template(format!(
                "{BUDGET_EXCEEDED}: more than {RENDER_FUEL} instructions"
            ))),
            Err(e) if e.kind() == ErrorKind::WriteFailure && out.buf.len() >= limit => {
                Err(Error::Template(format!(
                    "{BUDGET_EXCEEDED}: more than {limit} bytes of output"
                )))
            }
            Err(e) => Err(Error::Template(one_line(&e))),
        }
    }

    /// Renders a one-message conversation and fails only if that exceeds the
    /// budget: a template that loops or grows without bound usually does so
    /// for any input, and is better refused once than run for every prompt.
    pub fn check_budget(&self) -> Result<()> {
        match self.render(&[Message::new("user", "Hello")], true) {
            Err(e @ Error::Template(_)) if is_budget_error(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Renders the conversation and tokenizes it for a client that is not
    /// trusted with control tokens: special-token text inside a message's
    /// content (`x<|im_start|>system`) is tokenized as ordinary text, while
    /// the special tokens the template itself writes stay control tokens. A
    /// role that contains special-token text is refused.
    ///
    /// A conversation whose contents hold no special-token text gets exactly
    /// the tokens of `tokenizer.encode(&self.render(..)?, false)`. Otherwise
    /// the rendered text is split at the template's own special tokens and
    /// the pieces between them, contents included, are tokenized with
    /// special-token parsing off. When the template transforms a content so
    /// that its place in the output cannot be traced (say it slices it), such
    /// a conversation is refused with [`Error::InvalidArgument`].
    pub fn encode_untrusted(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let specials = tokenizer.special_tokens();
        let found_in = |s: &str| specials.iter().find(|(_, t)| s.contains(t.as_str()));
        for (i, m) in messages.iter().enumerate() {
            if let Some((_, t)) = found_in(&m.role) {
                return Err(Error::InvalidArgument(format!(
                    "messages[{i}].role contains the special token {t:?}"
                )));
            }
        }
        let text = self.render(messages, add_generation_prompt)?;
        let Some((i, token)) = messages
            .iter()
            .enumerate()
            .find_map(|(i, m)| found_in(&m.content).map(|(_, t)| (i, t)))
        else {
            return tokenizer.encode(&text, false);
        };
        let spans = self
            .content_spans(messages, add_generation_prompt, &text)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "messages[{i}].content contains the special token {token:?}, which this \
                     model's chat template does not let nibble keep as text"
                ))
            })?;
        let mut ids = Vec::new();
        let mut piece = 0;
        let mut at = 0;
        let mut spans = spans.into_iter().peekable();
        let bytes = text.as_bytes();
        while at < text.len() {
            while spans.peek().is_some_and(|s| s.end <= at) {
                spans.next();
            }
            let content = spans.peek().cloned().unwrap_or(text.len()..text.len());
            if content.contains(&at) {
                at = content.end;
                continue;
            }
            // The template's own special tokens: those not overlapping a content.
            let special = specials
                .iter()
                .filter(|(_, t)| {
                    bytes[at..].starts_with(t.as_bytes())
                        && (at + t.len() <= content.start || content.is_empty())
                })
                .max_by_key(|(_, t)| t.len());
            match special {
                Some((id, t)) => {
                    ids.extend(tokenizer.encode_as_text(&text[piece..at])?);
                    ids.push(*id);
                    at += t.len();
                    piece = at;
                }
                None => at += 1,
            }
        }
        ids.extend(tokenizer.encode_as_text(&text[piece..])?);
        Ok(ids)
    }

    /// Where each message content lies in `text` (the render of `messages`):
    /// renders again with every content between markers and checks that
    /// dropping the markers gives `text` back. `None` when it does not (the
    /// template does more than copy contents) or a content holds a marker.
    fn content_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        text: &str,
    ) -> Option<Vec<Range<usize>>> {
        if messages.iter().any(|m| m.content.contains([OPEN, CLOSE])) {
            return None;
        }
        let marked: Vec<Message> = messages
            .iter()
            .map(|m| Message::new(m.role.clone(), format!("{OPEN}{}{CLOSE}", m.content)))
            .collect();
        let probe = self.render(&marked, add_generation_prompt).ok()?;
        let mut plain = String::with_capacity(text.len());
        let mut spans = Vec::new();
        let mut open = None;
        for c in probe.chars() {
            match c {
                OPEN if open.is_none() => open = Some(plain.len()),
                CLOSE => spans.push(open.take()?..plain.len()),
                OPEN => return None,
                c => plain.push(c),
            }
        }
        (open.is_none() && plain == text).then_some(spans)
    }
}

/// Whether `e` is a render that exceeded its budget (see [`RENDER_FUEL`]).
pub fn is_budget_error(e: &Error) -> bool {
    matches!(e, Error::Template(m) if m.starts_with(BUDGET_EXCEEDED))
}

/// Collects the rendered text and fails the render once it passes `limit`.
struct CappedWriter {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.buf.resize(self.limit, 0);
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
    /// A template that exceeds its budget on a one-line conversation fails
    /// here rather than at the first turn.
    pub fn new(model: &'m Model, system: Option<&str>, opts: SessionOptions) -> Result<Self> {
        let template = ChatTemplate::from_model(model)?;
        template.check_budget()?;
        Ok(Self {
            template,
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
