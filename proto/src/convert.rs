//! Conversions between protocol messages and the core's types.

use duo_core::engine::driver::KindCount;
use duo_core::engine::{DraftTree, Mode, Stats};
use duo_core::runtime::ModelInfo;
use duo_core::sampling::{Distribution, SamplingParams};
use duo_core::speculative::round::{DraftSync, RoundKind};
use duo_core::speculative::stop::FinishReason;
use duo_core::speculative::verify::MAX_PROPOSAL_ENTRIES;

use crate::pb;

pub fn mode_from_pb(m: i32) -> Result<Mode, String> {
    match pb::Mode::try_from(m) {
        Ok(pb::Mode::Unspecified | pb::Mode::Duodecoding) => Ok(Mode::Duodecoding),
        Ok(pb::Mode::Speculative) => Ok(Mode::Speculative),
        Ok(pb::Mode::Autoregressive) => Ok(Mode::Autoregressive),
        Err(_) => Err(format!(
            "unknown mode {m}: use MODE_DUODECODING (1), MODE_SPECULATIVE (2) or MODE_AUTOREGRESSIVE (3)"
        )),
    }
}

pub fn mode_to_pb(m: Mode) -> pb::Mode {
    match m {
        Mode::Duodecoding => pb::Mode::Duodecoding,
        Mode::Speculative => pb::Mode::Speculative,
        Mode::Autoregressive => pb::Mode::Autoregressive,
    }
}

pub fn finish_to_pb(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
    }
}

pub fn stats_to_pb(s: &Stats, draft_worker: &str) -> pb::Stats {
    pb::Stats {
        prompt_tokens: s.prompt_tokens as u32,
        new_tokens: s.new_tokens as u32,
        rounds: s.rounds as u32,
        drafted: s.drafted as u32,
        accepted: s.accepted as u32,
        mean_accepted: s.mean_accepted,
        ttft_ms: s.ttft_ms,
        total_ms: s.total_ms,
        tokens_per_s: s.tokens_per_s,
        target_busy_ms: s.target_busy_ms,
        target_idle_ms: s.target_idle_ms,
        draft_busy_ms: s.draft_busy_ms,
        draft_idle_ms: s.draft_idle_ms,
        gamma_mean: s.gamma_mean,
        k_rounds: s
            .k_hist
            .iter()
            .map(|(k, n)| (*k as u32, *n as u32))
            .collect(),
        draft_worker: draft_worker.to_string(),
        mode: mode_to_pb(s.mode) as i32,
        draft_failures: s.draft_failures as u32,
        draftless_rounds: s.draftless_rounds as u32,
        hedges: s.hedges as u32,
        hedge_hits: s.hedge_hits as u32,
        single_token_rounds: s.single_token_rounds as u32,
        round_kinds: s
            .round_kinds
            .iter()
            .map(|(k, c)| {
                (
                    k.as_str().to_string(),
                    pb::KindCount {
                        rounds: c.rounds as u32,
                        tokens: c.tokens as u32,
                    },
                )
            })
            .collect(),
    }
}

pub fn sync_to_pb(s: &DraftSync) -> pb::Sync {
    pb::Sync {
        adopt: s.adopt.map(|a| a as u32),
        keep: s.keep as u32,
        append: s.append.clone(),
    }
}

pub fn sync_from_pb(s: &pb::Sync) -> DraftSync {
    DraftSync {
        adopt: s.adopt.map(|a| a as usize),
        keep: s.keep as usize,
        append: s.append.clone(),
    }
}

pub fn tree_to_pb(t: &DraftTree) -> pb::DraftTree {
    pb::DraftTree {
        branches: t
            .branches
            .iter()
            .enumerate()
            .map(|(j, b)| pb::Branch {
                tokens: b.clone(),
                proposals: t
                    .proposals
                    .get(j)
                    .map(|qs| qs.iter().map(proposal_to_pb).collect())
                    .unwrap_or_default(),
                anchor: t.anchors.get(j).copied().flatten().map(|a| a as u32),
            })
            .collect(),
        forward_steps: t.forward_steps as u32,
        secs: t.secs,
    }
}

/// A draft worker's tree, its proposals checked (see [`proposals_from_pb`]):
/// a malformed one is the worker's failure, never the generation's.
pub fn tree_from_pb(t: pb::DraftTree, vocab: usize) -> Result<DraftTree, String> {
    let sampled = t.branches.iter().any(|b| !b.proposals.is_empty());
    let anchored = t.branches.iter().any(|b| b.anchor.is_some());
    let mut proposals = Vec::new();
    let mut branches = Vec::new();
    let mut anchors = Vec::new();
    for b in t.branches {
        if sampled {
            proposals.push(proposals_from_pb(&b.proposals, &b.tokens, vocab)?);
        }
        if anchored {
            anchors.push(b.anchor.map(|a| a as usize));
        }
        branches.push(b.tokens);
    }
    Ok(DraftTree {
        branches,
        anchors,
        proposals,
        forward_steps: t.forward_steps as usize,
        secs: t.secs,
    })
}

/// A session's sampling settings from the wire (`top_p` 0 reads as 1, off),
/// checked; INVALID_ARGUMENT says what to fix.
pub fn sampling_from_pb(
    temperature: f32,
    top_k: u32,
    top_p: f32,
) -> Result<SamplingParams, tonic::Status> {
    let sampling = SamplingParams {
        temperature,
        top_k: top_k as usize,
        top_p: if top_p == 0.0 { 1.0 } else { top_p },
    };
    sampling
        .validate()
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    Ok(sampling)
}

pub fn proposal_to_pb(q: &Distribution) -> pb::Proposal {
    let (ids, probs) = q.entries().iter().copied().unzip();
    pb::Proposal { ids, probs }
}

/// The proposals of drafted `tokens` (one each, the token among its
/// entries), kept exactly as sent; the message says what is wrong (see
/// `Proposal` in duo.proto for the bounds).
pub fn proposals_from_pb(
    qs: &[pb::Proposal],
    tokens: &[u32],
    vocab: usize,
) -> Result<Vec<Distribution>, String> {
    if qs.len() != tokens.len() {
        return Err(format!(
            "{} proposals for {} drafted tokens (one per token)",
            qs.len(),
            tokens.len()
        ));
    }
    qs.iter()
        .zip(tokens)
        .enumerate()
        .map(|(i, (q, &t))| {
            if q.ids.len() != q.probs.len() {
                return Err(format!(
                    "proposal {i} has {} ids but {} probabilities",
                    q.ids.len(),
                    q.probs.len()
                ));
            }
            let d = Distribution::from_entries(
                q.ids.iter().copied().zip(q.probs.iter().copied()).collect(),
                vocab,
                MAX_PROPOSAL_ENTRIES,
            )
            .map_err(|e| format!("proposal {i}: {e}"))?;
            if d.prob(t) <= 0.0 {
                return Err(format!(
                    "proposal {i} gives its drafted token {t} no probability"
                ));
            }
            Ok(d)
        })
        .collect()
}

pub fn model_to_pb(m: &ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        path: m.path.display().to_string(),
        layers: m.num_layers as u32,
        kv_heads: m.kv_heads as u32,
        head_dim: m.head_dim as u32,
        vocab_size: m.vocab_size as u32,
        context_len: m.context_len.unwrap_or(0) as u32,
        provider: m.provider.to_string(),
        threads: m.intra_threads as u32,
        eos_token_ids: m.eos_token_ids.clone(),
        padded_vocab_size: m.padded_vocab_size as u32,
    }
}

/// Inverse of [`finish_to_pb`]; unknown values read as `Length`.
pub fn finish_from_pb(f: i32) -> FinishReason {
    match pb::FinishReason::try_from(f) {
        Ok(pb::FinishReason::Eos) => FinishReason::Eos,
        Ok(pb::FinishReason::Stop) => FinishReason::Stop,
        _ => FinishReason::Length,
    }
}

/// Inverse of [`stats_to_pb`] (the draft worker's name is not part of `Stats`).
pub fn stats_from_pb(s: &pb::Stats) -> Stats {
    Stats {
        mode: mode_from_pb(s.mode).unwrap_or_default(),
        prompt_tokens: s.prompt_tokens as usize,
        new_tokens: s.new_tokens as usize,
        rounds: s.rounds as usize,
        drafted: s.drafted as usize,
        accepted: s.accepted as usize,
        mean_accepted: s.mean_accepted,
        ttft_ms: s.ttft_ms,
        total_ms: s.total_ms,
        tokens_per_s: s.tokens_per_s,
        target_busy_ms: s.target_busy_ms,
        target_idle_ms: s.target_idle_ms,
        draft_busy_ms: s.draft_busy_ms,
        draft_idle_ms: s.draft_idle_ms,
        gamma_mean: s.gamma_mean,
        k_hist: s
            .k_rounds
            .iter()
            .map(|(k, n)| (*k as usize, *n as usize))
            .collect(),
        draft_failures: s.draft_failures as usize,
        draftless_rounds: s.draftless_rounds as usize,
        hedges: s.hedges as usize,
        hedge_hits: s.hedge_hits as usize,
        single_token_rounds: s.single_token_rounds as usize,
        round_kinds: s
            .round_kinds
            .iter()
            .filter_map(|(k, c)| {
                let kind = RoundKind::from_name(k)?;
                Some((
                    kind,
                    KindCount {
                        rounds: c.rounds as usize,
                        tokens: c.tokens as usize,
                    },
                ))
            })
            .collect(),
        ..Stats::default()
    }
}
