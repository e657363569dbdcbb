//! Streamed text is exact: for every tokenizer the project ships (the
//! bundled byte-level BPE and the "bring your own model" fixtures, among
//! them byte-fallback ones: Llama, Mistral, Phi-3), random token sequences
//! streamed through [`IncrementalDecoder`] and the stop rules
//! ([`Terminator`]) in rounds of random sizes give exactly
//! `tokenizer.decode(all ids)` — no text lost after byte-fallback tokens,
//! none changed after it was shown.

use std::path::{Path, PathBuf};

use duo_core::speculative::stop::{StopConfig, Terminator};
use duo_core::tokenizer::{IncrementalDecoder, Tokenizer};
use proptest::prelude::*;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// Every tokenizer.json of the repository, by name.
fn tokenizers() -> Vec<(String, Tokenizer)> {
    let mut out = Vec::new();
    let bundled = models().join("tokenizer.json");
    if let Ok(t) = Tokenizer::from_file(&bundled) {
        out.push(("bundled".to_string(), t));
    }
    let byom = models().join("fixtures/byom");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&byom)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.sort();
    for dir in dirs {
        if dir.join("tokenizer.json").is_file() {
            match Tokenizer::from_model_dir(&dir) {
                Ok(t) => out.push((dir.display().to_string(), t)),
                Err(e) => panic!("{}: {e}", dir.display()),
            }
        }
    }
    out
}

/// The byte-fallback ids of `tok` (empty when its decoder has none).
fn byte_ids(tok: &Tokenizer) -> Vec<u32> {
    (0..tok.id_limit() as u32)
        .filter(|&id| tok.is_byte_token(id))
        .collect()
}

/// Streams `ids` in rounds of `runs` sizes (cycled) through the stop rules
/// (no stop sequence, no end id) and the decoder; returns the shown text.
fn stream(tok: &Tokenizer, ids: &[u32], runs: &[usize]) -> String {
    let mut term = Terminator::new(StopConfig {
        max_new_tokens: ids.len() + 1,
        eos: Vec::new(),
        stop_sequences: Vec::new(),
    });
    let mut dec = IncrementalDecoder::new();
    let mut shown = String::new();
    let mut rest = ids;
    let mut sizes = runs.iter().cycle();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
        let (now, later) = rest.split_at(n);
        let commit = match term.commit(now, |t| dec.push(tok, t)) {
            Ok(c) => c,
            Err(e) => panic!("commit: {e}"),
        };
        shown += &commit.text;
        rest = later;
    }
    let tail = match dec.finish(tok) {
        Ok(t) => t,
        Err(e) => panic!("finish: {e}"),
    };
    shown + &term.finish(&tail).text
}

#[test]
fn byte_fallback_fixtures_are_detected() {
    let all = tokenizers();
    let with_bytes: Vec<&str> = all
        .iter()
        .filter(|(_, t)| !byte_ids(t).is_empty())
        .map(|(n, _)| n.as_str())
        .collect();
    for family in ["llama", "mistral", "phi3"] {
        assert!(
            with_bytes.iter().any(|n| n.ends_with(family)),
            "{family} should be a byte-fallback tokenizer: {with_bytes:?}"
        );
    }
    for family in ["bundled", "gpt2", "qwen2"] {
        assert!(
            !with_bytes.iter().any(|n| n.ends_with(family)),
            "{family} is byte-level BPE, not byte fallback"
        );
    }
}

/// The reproduction: "é" as bytes, then one more byte, then a word.
/// `decode` makes the three bytes three U+FFFD and keeps " garden"; the
/// stream must show exactly that, not "é" and then nothing.
#[test]
fn word_after_an_invalid_byte_run_is_kept() -> anyhow::Result<()> {
    for (name, tok) in tokenizers() {
        if byte_ids(&tok).is_empty() {
            continue;
        }
        let byte = |b: u8| {
            tok.token_id(&format!("<0x{b:02X}>"))
                .ok_or_else(|| anyhow::anyhow!("{name}: no <0x{b:02X}>"))
        };
        let mut ids = tok.encode("Hello")?;
        ids.extend([byte(0xC3)?, byte(0xA9)?, byte(0xC3)?]);
        ids.extend(tok.encode(" garden!")?);
        let full = tok.decode(&ids)?;
        assert!(full.contains("garden!"), "{name}: {full:?}");
        for runs in [[1usize].as_slice(), &[2], &[3, 1], &[7]] {
            assert_eq!(stream(&tok, &ids, runs), full, "{name}, runs {runs:?}");
        }
    }
    Ok(())
}

/// Ids drawn half from the byte tokens (when there are any) and half from
/// the whole vocabulary.
fn ids_for(tok: &Tokenizer) -> impl Strategy<Value = (Vec<u32>, Vec<usize>)> {
    let bytes = byte_ids(tok);
    let limit = tok.id_limit() as u32;
    let pick = (any::<bool>(), any::<prop::sample::Index>(), 0..limit).prop_map(
        move |(use_byte, i, id)| {
            if use_byte && !bytes.is_empty() {
                bytes[i.index(bytes.len())]
            } else {
                id
            }
        },
    );
    (
        prop::collection::vec(pick, 0..40),
        prop::collection::vec(1usize..6, 1..5),
    )
}

#[test]
fn streamed_text_equals_decode_for_every_split() {
    for (name, tok) in tokenizers() {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 300,
            ..ProptestConfig::default()
        });
        let result = runner.run(&ids_for(&tok), |(ids, runs)| {
            let full = tok
                .decode(&ids)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(stream(&tok, &ids, &runs), full, "ids {:?}", ids);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
    }
}

/// Real text through a byte-fallback tokenizer (emoji and accents encode
/// as byte tokens there): streamed one token at a time it is the text.
#[test]
fn real_text_round_trips_through_the_stream() -> anyhow::Result<()> {
    for (name, tok) in tokenizers() {
        for text in [
            "Hello world, garden! café – naïve — 東京 🙂 emoji 🙂🙂",
            "👩‍👩‍👧 families, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!",
        ] {
            let ids = tok.encode(text)?;
            let full = tok.decode(&ids)?;
            assert_eq!(stream(&tok, &ids, &[1]), full, "{name}: {text:?}");
        }
    }
    Ok(())
}
