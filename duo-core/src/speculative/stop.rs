//! Termination: when a generation stops and exactly which text it shows.
//!
//! Pure logic, no I/O. The speculative loop commits verified tokens in runs
//! (an accepted draft prefix plus the target's next token); [`Terminator`]
//! decides how many of them belong to the generation, which text may be
//! shown now, and why the generation ended:
//!
//! - at most [`StopConfig::max_new_tokens`] tokens in total
//!   ([`FinishReason::Length`]);
//! - at the EOS token, which is counted but shows no text
//!   ([`FinishReason::Eos`]);
//! - at the first token whose text completes a stop sequence; the text is cut
//!   just before the sequence, which is not shown ([`FinishReason::Stop`]).
//!
//! Stop sequences may span token and run boundaries, so text that could be
//! the start of a stop sequence is held back until it is known not to be one.

use serde::{Deserialize, Serialize};

/// What ends a generation.
///
/// Invariant: stop sequences are matched on decoded text, never on ids;
/// empty stop sequences are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConfig {
    /// The most tokens the generation may produce, the EOS token included.
    /// `0` ends the generation before its first token.
    pub max_new_tokens: usize,
    /// The end-of-text ids (empty if the model has none): the generation
    /// stops at any of them, as transformers' `generate` stops at any id of
    /// `generation_config.json`'s `eos_token_id` list.
    pub eos: Vec<u32>,
    /// Texts that end the generation when they appear in its output.
    pub stop_sequences: Vec<String>,
}

/// Why a generation ended. Serialized as `"length"`, `"eos"`, `"stop"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_new_tokens` tokens were produced.
    Length,
    /// The EOS token was produced.
    Eos,
    /// A stop sequence appeared in the text.
    Stop,
}

/// The outcome of one [`Terminator::commit`] or [`Terminator::finish`].
///
/// Invariant: `accepted` never exceeds the number of tokens passed in; once
/// `finish` is `Some`, every later commit accepts 0 tokens and shows no text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// How many leading tokens of the committed run belong to the
    /// generation (counted against `max_new_tokens`); the caller discards the
    /// rest. Includes the EOS token and the token that completed a stop
    /// sequence.
    pub accepted: usize,
    /// Text to show now: continues the text shown so far.
    pub text: String,
    /// Why the generation ended, if it did.
    pub finish: Option<FinishReason>,
}

/// Feeds on a generation's committed tokens, run by run, and decides what is
/// shown and when to stop.
///
/// Invariants:
/// - the total number of accepted tokens never exceeds `max_new_tokens`;
/// - the concatenation of all shown text is always a prefix of the full text
///   of the accepted non-EOS tokens, and after [`finish`](Self::finish) it
///   equals that text cut just before the earliest-starting stop-sequence
///   occurrence (the generation stops at the first token whose text completes
///   any occurrence);
/// - `held` never contains a complete stop sequence, and what was shown
///   never contains the start of one.
#[derive(Debug, Clone)]
pub struct Terminator {
    config: StopConfig,
    generated: usize,
    /// Text not shown yet: it may be the start of a stop sequence.
    held: String,
    reason: Option<FinishReason>,
    closed: bool,
}

impl Terminator {
    /// A terminator for a new generation; empty stop sequences are dropped.
    pub fn new(mut config: StopConfig) -> Self {
        config.stop_sequences.retain(|s| !s.is_empty());
        Self {
            config,
            generated: 0,
            held: String::new(),
            reason: None,
            closed: false,
        }
    }

    /// Tokens accepted so far (EOS included).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Tokens still allowed before `max_new_tokens` is reached; 0 once the
    /// generation has ended. Useful to cap a draft's length.
    pub fn remaining(&self) -> usize {
        if self.reason.is_some() || self.closed {
            0
        } else {
            self.config.max_new_tokens.saturating_sub(self.generated)
        }
    }

    /// Why the generation ended, if it did.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.reason
    }

    /// Commits a run of newly verified `tokens`, in order.
    ///
    /// `text_of` gives each token's text chunk and is called exactly once per
    /// accepted non-EOS token, in order, and never for the EOS token or for
    /// tokens past the end; typically it is
    /// `|t| decoder.push(&tokenizer, t)` on a
    /// [`crate::tokenizer::IncrementalDecoder`], whose chunks may be empty
    /// and may carry text of earlier tokens.
    ///
    /// When the result's `finish` is `Some`, call [`finish`](Self::finish)
    /// to get the text still held back.
    ///
    /// Errors: the first error of `text_of`, returned as is; the tokens
    /// before the failing one stay accepted and their text stays held back
    /// (not lost).
    pub fn commit<E>(
        &mut self,
        tokens: &[u32],
        mut text_of: impl FnMut(u32) -> Result<String, E>,
    ) -> Result<Commit, E> {
        let mut accepted = 0;
        if self.reason.is_none() && !self.closed {
            for &token in tokens {
                if self.generated >= self.config.max_new_tokens {
                    break;
                }
                if self.config.eos.contains(&token) {
                    self.generated += 1;
                    accepted += 1;
                    self.reason = Some(FinishReason::Eos);
                    break;
                }
                let piece = text_of(token)?;
                self.generated += 1;
                accepted += 1;
                self.held.push_str(&piece);
                if let Some(at) = self.first_stop(&self.held) {
                    self.held.truncate(at);
                    self.reason = Some(FinishReason::Stop);
                    // Everything before the stop sequence is shown now.
                    let text = std::mem::take(&mut self.held);
                    return Ok(self.result(accepted, text));
                }
            }
            if self.reason.is_none() && self.generated >= self.config.max_new_tokens {
                self.reason = Some(FinishReason::Length);
            }
        }
        let keep = self.stop_prefix_len(&self.held);
        let text = self.held.drain(..self.held.len() - keep).collect();
        Ok(self.result(accepted, text))
    }

    /// Ends the generation: appends `tail` (e.g. what
    /// [`crate::tokenizer::IncrementalDecoder::finish`] returns) to the
    /// held-back text and shows it all, cut before a stop sequence if one
    /// is now complete (then the reason becomes `Stop`).
    ///
    /// `finish` is `None` when the caller ends the generation for its own
    /// reasons before any limit. After `finish`, commits accept nothing and
    /// further calls show nothing.
    pub fn finish(&mut self, tail: &str) -> Commit {
        if self.closed || self.reason == Some(FinishReason::Stop) {
            self.closed = true;
            return self.result(0, String::new());
        }
        self.closed = true;
        self.held.push_str(tail);
        if let Some(at) = self.first_stop(&self.held) {
            self.held.truncate(at);
            self.reason = Some(FinishReason::Stop);
        }
        let text = std::mem::take(&mut self.held);
        self.result(0, text)
    }

    fn result(&self, accepted: usize, text: String) -> Commit {
        Commit {
            accepted,
            text,
            finish: self.reason,
        }
    }

    /// Byte offset of the earliest-starting stop-sequence occurrence in
    /// `text`.
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.config
            .stop_sequences
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the longest suffix of `text` that is a proper prefix of some
    /// stop sequence (always at a char boundary).
    fn stop_prefix_len(&self, text: &str) -> usize {
        text.char_indices()
            .map(|(i, _)| &text[i..])
            .find(|suffix| {
                self.config
                    .stop_sequences
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{IncrementalDecoder, Tokenizer};
    use std::convert::Infallible;

    const EOS: u32 = 0;

    /// Token `t` (1-based) has text `PIECES[t - 1]`; the EOS token is 0.
    const PIECES: &[&str] = &[
        "Hel", "lo", " wor", "ld", "<", "/", "s", ">", "!", "\n", "EN", "D",
    ];

    fn text_of(t: u32) -> Result<String, Infallible> {
        Ok(PIECES[t as usize - 1].to_string())
    }

    fn terminator(max: usize, stops: &[&str]) -> Terminator {
        Terminator::new(StopConfig {
            max_new_tokens: max,
            eos: vec![EOS],
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn commit(term: &mut Terminator, tokens: &[u32]) -> Commit {
        match term.commit(tokens, text_of) {
            Ok(c) => c,
            Err(e) => match e {},
        }
    }

    fn expect(accepted: usize, text: &str, finish: Option<FinishReason>) -> Commit {
        Commit {
            accepted,
            text: text.to_string(),
            finish,
        }
    }

    #[test]
    fn max_tokens_inside_a_run() {
        let mut t = terminator(5, &[]);
        assert_eq!(commit(&mut t, &[1, 2]), expect(2, "Hello", None));
        assert_eq!(t.remaining(), 3);
        let c = commit(&mut t, &[3, 4, 9, 10, 11]);
        assert_eq!(c, expect(3, " world!", Some(FinishReason::Length)));
        assert_eq!(t.generated(), 5);
        assert_eq!(t.remaining(), 0);
        assert_eq!(
            commit(&mut t, &[1]),
            expect(0, "", Some(FinishReason::Length))
        );
        assert_eq!(t.finish(""), expect(0, "", Some(FinishReason::Length)));
    }

    #[test]
    fn max_tokens_exactly_at_run_end_and_zero() {
        let mut t = terminator(2, &[]);
        assert_eq!(
            commit(&mut t, &[1, 2]),
            expect(2, "Hello", Some(FinishReason::Length))
        );
        let mut t = terminator(0, &[]);
        assert_eq!(
            commit(&mut t, &[]),
            expect(0, "", Some(FinishReason::Length))
        );
        let mut t = terminator(0, &[]);
        assert_eq!(
            commit(&mut t, &[1, 2]),
            expect(0, "", Some(FinishReason::Length))
        );
    }

    #[test]
    fn eos_inside_a_run_is_counted_not_shown() {
        let mut t = terminator(10, &[]);
        let mut seen = Vec::new();
        let c = t.commit(&[1, 2, EOS, 3], |tok| {
            seen.push(tok);
            text_of(tok)
        });
        assert_eq!(c, Ok(expect(3, "Hello", Some(FinishReason::Eos))));
        assert_eq!(seen, [1, 2]);
        assert_eq!(t.generated(), 3);
        // EOS as the last allowed token reports Eos, not Length.
        let mut t = terminator(3, &[]);
        assert_eq!(
            commit(&mut t, &[1, 2, EOS]),
            expect(3, "Hello", Some(FinishReason::Eos))
        );
        // No EOS configured: id 0 is ordinary text.
        let mut t = Terminator::new(StopConfig {
            max_new_tokens: 10,
            eos: vec![],
            stop_sequences: vec![],
        });
        let c = t.commit(&[1, 0], |tok| Ok::<_, Infallible>(format!("<{tok}>")));
        assert_eq!(c, Ok(expect(2, "<1><0>", None)));
        // Several end ids (e.g. Llama 3's end of text and end of turn): any
        // of them ends the generation.
        for end in [7, 9] {
            let mut t = Terminator::new(StopConfig {
                max_new_tokens: 10,
                eos: vec![7, 9],
                stop_sequences: vec![],
            });
            let c = t.commit(&[1, end, 2], |tok| Ok::<_, Infallible>(format!("<{tok}>")));
            assert_eq!(c, Ok(expect(2, "<1>", Some(FinishReason::Eos))));
        }
    }

    #[test]
    fn stop_sequence_inside_a_run() {
        let mut t = terminator(20, &["</s>"]);
        // "Hello world</s>!": "<" is held back after token 5 but stop
        // completes in the same run, at token 8.
        let c = commit(&mut t, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(c, expect(8, "Hello world", Some(FinishReason::Stop)));
        assert_eq!(t.finish(""), expect(0, "", Some(FinishReason::Stop)));
        assert_eq!(
            commit(&mut t, &[1]),
            expect(0, "", Some(FinishReason::Stop))
        );
    }

    #[test]
    fn stop_sequence_spanning_runs_and_tokens() {
        let mut t = terminator(20, &["</s>"]);
        assert_eq!(
            commit(&mut t, &[1, 2, 3, 4, 5]),
            expect(5, "Hello world", None)
        );
        assert_eq!(commit(&mut t, &[6]), expect(1, "", None));
        assert_eq!(
            commit(&mut t, &[7, 8, 9, 10]),
            expect(2, "", Some(FinishReason::Stop))
        );
        assert_eq!(t.generated(), 8);
    }

    #[test]
    fn stop_sequence_inside_one_token() {
        let mut t = terminator(20, &["or"]);
        assert_eq!(
            commit(&mut t, &[1, 2, 3, 4]),
            expect(3, "Hello w", Some(FinishReason::Stop))
        );
    }

    #[test]
    fn held_text_released_when_partial_match_fails() {
        let mut t = terminator(20, &["</stop>"]);
        assert_eq!(commit(&mut t, &[1, 5]), expect(2, "Hel", None));
        assert_eq!(commit(&mut t, &[6, 7]), expect(2, "", None));
        // "</s>" is not "</stop>": released once ">" arrives.
        assert_eq!(commit(&mut t, &[8, 9]), expect(2, "</s>!", None));
        // Held-back text at the end is released by finish.
        assert_eq!(commit(&mut t, &[5, 6]), expect(2, "", None));
        assert_eq!(t.finish(""), expect(0, "</", None));
        assert_eq!(commit(&mut t, &[1]), expect(0, "", None));
        assert_eq!(t.finish("more"), expect(0, "", None));
    }

    #[test]
    fn held_text_released_at_length_via_finish() {
        let mut t = terminator(3, &["</s>"]);
        assert_eq!(
            commit(&mut t, &[1, 2, 5]),
            expect(3, "Hello", Some(FinishReason::Length))
        );
        assert_eq!(t.finish(""), expect(0, "<", Some(FinishReason::Length)));
    }

    #[test]
    fn finish_tail_can_complete_a_stop() {
        let mut t = terminator(3, &["</s>"]);
        assert_eq!(
            commit(&mut t, &[1, 5, 6]),
            expect(3, "Hel", Some(FinishReason::Length))
        );
        assert_eq!(t.finish("s>x"), expect(0, "", Some(FinishReason::Stop)));
    }

    #[test]
    fn earliest_occurrence_wins() {
        // Both complete at token 4 ("Hello world"): "o world" starts earlier.
        let mut t = terminator(20, &["world", "o world"]);
        assert_eq!(
            commit(&mut t, &[1, 2, 3, 4]),
            expect(4, "Hell", Some(FinishReason::Stop))
        );
        // The first stop completed ends the generation: "ld" completes at
        // token 4, before "ld<" could.
        let mut t = terminator(20, &["ld<", "ld"]);
        assert_eq!(
            commit(&mut t, &[1, 2, 3, 4, 5]),
            expect(4, "Hello wor", Some(FinishReason::Stop))
        );
        // Order in the list does not matter.
        let mut t = terminator(20, &["\nEND", "!"]);
        assert_eq!(
            commit(&mut t, &[1, 2, 9, 10, 11, 12]),
            expect(3, "Hello", Some(FinishReason::Stop))
        );
    }

    #[test]
    fn empty_stop_list_and_empty_stop_strings() {
        for stops in [&[][..], &[""][..]] {
            let mut t = terminator(20, stops);
            assert_eq!(commit(&mut t, &[1, 5, 6]), expect(3, "Hel</", None));
            assert_eq!(t.finish(""), expect(0, "", None));
        }
    }

    #[test]
    fn multibyte_prefixes_are_held_at_char_boundaries() {
        let pieces = ["a", "é", "🙂", "b"];
        let mut t = Terminator::new(StopConfig {
            max_new_tokens: 10,
            eos: vec![],
            stop_sequences: vec!["é🙂!".into()],
        });
        let mut c =
            |toks: &[u32]| t.commit(toks, |x| Ok::<_, Infallible>(pieces[x as usize].into()));
        assert_eq!(c(&[0, 1]), Ok(expect(2, "a", None)));
        assert_eq!(c(&[2]), Ok(expect(1, "", None)));
        assert_eq!(c(&[3]), Ok(expect(1, "é🙂b", None)));
    }

    #[test]
    fn text_of_error_keeps_earlier_tokens() {
        let mut t = terminator(20, &["</s>"]);
        let r = t.commit(&[1, 5, 2], |tok| {
            if tok == 2 {
                Err("boom")
            } else {
                Ok(PIECES[tok as usize - 1].to_string())
            }
        });
        assert_eq!(r, Err("boom"));
        assert_eq!(t.generated(), 2);
        assert_eq!(t.finish(""), expect(0, "Hel<", None));
    }

    #[test]
    fn finish_reason_serializes_lowercase() -> anyhow::Result<()> {
        assert_eq!(serde_json::to_string(&FinishReason::Length)?, "\"length\"");
        assert_eq!(serde_json::to_string(&FinishReason::Eos)?, "\"eos\"");
        assert_eq!(serde_json::to_string(&FinishReason::Stop)?, "\"stop\"");
        assert_eq!(
            serde_json::from_str::<FinishReason>("\"stop\"")?,
            FinishReason::Stop
        );
        Ok(())
    }

    /// Real tokenizer, streaming decoder, runs of uneven sizes: the shown
    /// text is the full decode cut before the stop sequence.
    #[test]
    fn with_real_tokenizer_and_incremental_decoder() -> anyhow::Result<()> {
        let tok = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/tokenizer.json"
        ))?;
        let text = "Good morrow 🙂, sweet prince. 東京 is far; farewell 🙂 friend.";
        let ids = tok.encode(text)?;
        for (stop, expected) in [
            (
                "🙂 friend",
                "Good morrow 🙂, sweet prince. 東京 is far; farewell ",
            ),
            ("東京", "Good morrow 🙂, sweet prince. "),
            ("farewell", "Good morrow 🙂, sweet prince. 東京 is far; "),
            ("not there", text),
        ] {
            for run in [1, 2, 3, 7] {
                let mut term = Terminator::new(StopConfig {
                    max_new_tokens: 1000,
                    eos: tok.eos_id().into_iter().collect(),
                    stop_sequences: vec![stop.to_string()],
                });
                let mut dec = IncrementalDecoder::new();
                let mut shown = String::new();
                let mut rest: &[u32] = &ids;
                while !rest.is_empty() {
                    let (now, later) = rest.split_at(run.min(rest.len()));
                    let c = term.commit(now, |t| dec.push(&tok, t))?;
                    assert!(text.starts_with(&(shown.clone() + &c.text)));
                    shown += &c.text;
                    if c.finish.is_some() {
                        break;
                    }
                    rest = later;
                }
                shown += &term.finish(&dec.finish(&tok)?).text;
                assert_eq!(shown, expected, "stop {stop:?}, runs of {run}");
            }
        }
        Ok(())
    }
}
