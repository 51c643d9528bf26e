//! `nibble chat` on a terminal: line editing and history (rustyline),
//! `"""` multi-line input and `/` commands. Piped input does not come here.

use nibble::{Conversation, Error, Result, Sampler};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use std::path::PathBuf;

/// Counts and times of one answer, for `--verbose`.
pub struct TurnStats {
    /// Prompt tokens fed (the part not already in the KV cache).
    pub prompt_tokens: usize,
    pub prompt_s: f64,
    pub gen_tokens: usize,
    pub gen_s: f64,
}

/// A sampler setting changed by `/set`.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Temp(f32),
    TopP(f32),
    TopK(usize),
}

/// A `/` command typed at the prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Help,
    Clear,
    System(String),
    Set(Setting),
    Bye,
    /// Not understood: the hint to print (nothing goes to the model).
    Invalid(String),
}

pub const HELP: &str = "\
/help            this list
/clear           forget the conversation (keeps the system prompt)
/system TEXT     start over with this system prompt
/set temp X      sampling temperature (0 = greedy)
/set top_p X     nucleus sampling threshold (1 = off)
/set top_k N     keep the N most likely tokens (0 = off)
/bye             leave (also Ctrl-D)
\"\"\"             starts and ends a multi-line message
Ctrl-C stops an answer; at the prompt it clears the line.";

/// Parses a line typed at the prompt: `None` if it is a message for the
/// model (it does not start with `/`).
pub fn parse_command(line: &str) -> Option<Command> {
    let line = line.trim();
    let rest = line.strip_prefix('/')?;
    let (name, arg) = match rest.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (rest, ""),
    };
    let no_arg = |c: Command| {
        if arg.is_empty() {
            c
        } else {
            Command::Invalid(format!(
                "/{name} takes no argument; /help lists the commands"
            ))
        }
    };
    Some(match name {
        "help" | "?" => no_arg(Command::Help),
        "clear" => no_arg(Command::Clear),
        "bye" | "exit" | "quit" => no_arg(Command::Bye),
        "system" if arg.is_empty() => Command::Invalid("usage: /system TEXT".into()),
        "system" => Command::System(arg.to_owned()),
        "set" => parse_set(arg),
        _ => Command::Invalid(format!("unknown command /{name}; /help lists the commands")),
    })
}

fn parse_set(arg: &str) -> Command {
    let usage = || Command::Invalid("usage: /set temp X | /set top_p X | /set top_k N".into());
    let mut words = arg.split_whitespace();
    let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
        return usage();
    };
    let bad = |what: &str| Command::Invalid(format!("/set {key}: {what}, not {value:?}"));
    match key {
        "temp" | "temperature" => match value.parse::<f32>() {
            Ok(t) if t.is_finite() && t >= 0.0 => Command::Set(Setting::Temp(t)),
            _ => bad("a number >= 0"),
        },
        "top_p" => match value.parse::<f32>() {
            Ok(p) if p > 0.0 && p <= 1.0 => Command::Set(Setting::TopP(p)),
            _ => bad("a number in (0, 1]"),
        },
        "top_k" => match value.parse::<usize>() {
            Ok(k) => Command::Set(Setting::TopK(k)),
            _ => bad("a whole number >= 0"),
        },
        _ => usage(),
    }
}

/// Multi-line input as Ollama's: a line starting with `"""` opens a message
/// that a line ending with `"""` closes. Feed each line read; returns the
/// finished input (a single-line message at once), or `None` while a
/// multi-line message is still open (`pending` holds it).
pub fn feed_line(pending: &mut Option<String>, line: &str) -> Option<String> {
    match pending.take() {
        Some(mut buf) => {
            if let Some(head) = line.trim_end().strip_suffix("\"\"\"") {
                buf.push('\n');
                buf.push_str(head);
                Some(buf.trim_matches('\n').to_owned())
            } else {
                buf.push('\n');
                buf.push_str(line);
                *pending = Some(buf);
                None
            }
        }
        None => {
            let Some(rest) = line.trim_start().strip_prefix("\"\"\"") else {
                return Some(line.to_owned());
            };
            match rest.trim_end().strip_suffix("\"\"\"") {
                Some(inner) => Some(inner.to_owned()),
                None => {
                    *pending = Some(rest.to_owned());
                    None
                }
            }
        }
    }
}

fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("nibble").join("history"))
}

fn readline_err(e: ReadlineError) -> Error {
    Error::InvalidArgument(format!("cannot read the terminal: {e}"))
}

/// The interactive loop. `turn` streams one answer and returns its stats.
pub fn run(
    conv: &mut Conversation,
    mut system: Option<String>,
    sampler: &mut Sampler,
    verbose: bool,
    turn: &mut dyn FnMut(&mut Conversation, &str, &mut Sampler) -> Result<TurnStats>,
) -> Result<()> {
    let mut ed = DefaultEditor::new().map_err(readline_err)?;
    let history = history_path();
    if let Some(h) = &history {
        let _ = ed.load_history(h);
    }
    let mut pending: Option<String> = None;
    let result = loop {
        let prompt = if pending.is_some() { "... " } else { ">>> " };
        let line = match ed.readline(prompt) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                // Ctrl-C at the prompt drops the line (and an open """ message).
                pending = None;
                continue;
            }
            Err(ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(readline_err(e)),
        };
        let multi = pending.is_some();
        let Some(input) = feed_line(&mut pending, &line) else {
            continue;
        };
        if input.trim().is_empty() {
            continue;
        }
        let _ = ed.add_history_entry(if multi { input.as_str() } else { line.as_str() });
        let command = if multi { None } else { parse_command(&input) };
        match command {
            None => match turn(conv, &input, sampler) {
                Ok(s) if verbose => eprintln!(
                    "[prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s]",
                    s.prompt_tokens,
                    rate(s.prompt_tokens, s.prompt_s),
                    s.gen_tokens,
                    rate(s.gen_tokens, s.gen_s)
                ),
                Ok(_) => {}
                Err(e @ Error::ContextFull { .. }) => {
                    eprintln!("error: {e}; /clear starts over")
                }
                Err(e) => eprintln!("error: {e}"),
            },
            Some(Command::Help) => eprintln!("{HELP}"),
            Some(Command::Bye) => break Ok(()),
            Some(Command::Clear) => {
                conv.reset(system.as_deref());
                eprintln!("[conversation cleared]");
            }
            Some(Command::System(s)) => {
                conv.reset(Some(&s));
                system = Some(s);
                eprintln!("[new conversation with this system prompt]");
            }
            Some(Command::Set(setting)) => {
                let mut o = sampler.options().clone();
                match setting {
                    Setting::Temp(t) => o.temperature = t,
                    Setting::TopP(p) => o.top_p = p,
                    Setting::TopK(k) => o.top_k = k,
                }
                match Sampler::new(o) {
                    Ok(s) => {
                        *sampler = s;
                        let o = sampler.options();
                        eprintln!(
                            "[temp {} top_p {} top_k {}]",
                            o.temperature, o.top_p, o.top_k
                        );
                    }
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            Some(Command::Invalid(hint)) => eprintln!("{hint}"),
        }
    };
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = ed.save_history(h);
    }
    result
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_not_commands() {
        assert_eq!(parse_command("hello /help"), None);
        assert_eq!(parse_command(""), None);
    }

    #[test]
    fn commands() {
        assert_eq!(parse_command("/help"), Some(Command::Help));
        assert_eq!(parse_command("  /bye "), Some(Command::Bye));
        assert_eq!(parse_command("/clear"), Some(Command::Clear));
        assert_eq!(
            parse_command("/system You are  terse."),
            Some(Command::System("You are  terse.".into()))
        );
        assert_eq!(
            parse_command("/set temp 0.7"),
            Some(Command::Set(Setting::Temp(0.7)))
        );
        assert_eq!(
            parse_command("/set top_p 0.9"),
            Some(Command::Set(Setting::TopP(0.9)))
        );
        assert_eq!(
            parse_command("/set top_k 20"),
            Some(Command::Set(Setting::TopK(20)))
        );
    }

    #[test]
    fn bad_commands_give_hints() {
        for bad in [
            "/frobnicate",
            "/system",
            "/set",
            "/set temp",
            "/set temp -1",
            "/set temp x",
            "/set top_p 1.5",
            "/set top_k 2.5",
            "/set seed 3",
            "/set temp 1 2",
            "/clear now",
        ] {
            assert!(
                matches!(parse_command(bad), Some(Command::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn multi_line_input() {
        let mut p = None;
        assert_eq!(feed_line(&mut p, "one line"), Some("one line".into()));
        assert_eq!(
            feed_line(&mut p, "\"\"\"inline\"\"\""),
            Some("inline".into())
        );
        assert_eq!(feed_line(&mut p, "\"\"\"first"), None);
        assert_eq!(feed_line(&mut p, "/help"), None);
        assert_eq!(
            feed_line(&mut p, "last\"\"\""),
            Some("first\n/help\nlast".into())
        );
        assert_eq!(p, None);
        assert_eq!(feed_line(&mut p, "\"\"\""), None);
        assert_eq!(feed_line(&mut p, "a"), None);
        assert_eq!(feed_line(&mut p, "\"\"\""), Some("a".into()));
    }
}
