//! The orchestrator's Prometheus metrics (`duo_orchestrator_*`). Recorded
//! once per request and per emitted chunk, never under a lock: the
//! `metrics` facade updates atomics.

use std::time::Instant;

use duo_core::engine::{Generation, Mode};
use tonic::Status;

/// Position labels for per-position acceptance ("1".."8", then "9+").
const POSITIONS: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "8", "9+"];

/// One finished request, by mode ("unknown" for an invalid one) and
/// outcome (a gRPC code name).
pub fn record_request(mode: Option<Mode>, res: &Result<(Generation, String), Status>) {
    let mode = mode.map_or_else(|| "unknown".to_string(), |m| m.to_string());
    let outcome = match res {
        Ok(_) => "ok".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    metrics::counter!("duo_orchestrator_requests_total", "mode" => mode, "outcome" => outcome)
        .increment(1);
}

/// Records a request whose future was dropped before it finished (the
/// client left) as `CANCELLED`; `finished` is set once the request has
/// been recorded the normal way.
pub(crate) struct Abandoned {
    pub(crate) mode: Option<Mode>,
    pub(crate) finished: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.finished {
            record_request(self.mode, &Err(Status::cancelled("the client left")));
        }
    }
}

/// Chunk timing: time to first token, then inter-token latency (a chunk of
/// n tokens counts as n tokens spaced evenly over its gap).
pub fn record_emission(last: &mut Option<Instant>, started: Instant, tokens: usize) {
    if tokens == 0 {
        return;
    }
    let now = Instant::now();
    match last {
        None => metrics::histogram!("duo_orchestrator_ttft_seconds")
            .record(now.duration_since(started).as_secs_f64()),
        Some(prev) => {
            let gap = now.duration_since(*prev).as_secs_f64() / tokens as f64;
            let h = metrics::histogram!("duo_orchestrator_inter_token_seconds");
            for _ in 0..tokens {
                h.record(gap);
            }
        }
    }
    *last = Some(now);
}

/// A finished generation's totals.
pub fn record_generation(g: &Generation) {
    let s = &g.stats;
    let mode = s.mode.to_string();
    let c = |name: &'static str, v: usize| {
        metrics::counter!(name, "mode" => mode.clone()).increment(v as u64);
    };
    c("duo_orchestrator_prompt_tokens_total", s.prompt_tokens);
    c("duo_orchestrator_generated_tokens_total", g.tokens.len());
    c("duo_orchestrator_rounds_total", s.rounds);
    c("duo_orchestrator_drafted_tokens_total", s.drafted);
    c("duo_orchestrator_accepted_tokens_total", s.accepted);
    c("duo_orchestrator_draft_failures_total", s.draft_failures);
    c(
        "duo_orchestrator_draftless_rounds_total",
        s.draftless_rounds,
    );
    c("duo_orchestrator_hedges_total", s.hedges);
    c("duo_orchestrator_hedge_hits_total", s.hedge_hits);
    c(
        "duo_orchestrator_single_token_rounds_total",
        s.single_token_rounds,
    );
    for (kind, count) in &s.round_kinds {
        let labels = [("mode", mode.clone()), ("kind", kind.as_str().to_string())];
        metrics::counter!("duo_orchestrator_rounds_by_kind_total", &labels)
            .increment(count.rounds as u64);
        metrics::counter!("duo_orchestrator_tokens_by_round_kind_total", &labels)
            .increment(count.tokens as u64);
    }
    let us = |name: &'static str, ms: f64| {
        metrics::counter!(name, "mode" => mode.clone()).increment((ms * 1e3).max(0.0) as u64);
    };
    us(
        "duo_orchestrator_target_busy_microseconds_total",
        s.target_busy_ms,
    );
    us(
        "duo_orchestrator_target_idle_microseconds_total",
        s.target_idle_ms,
    );
    us(
        "duo_orchestrator_draft_busy_microseconds_total",
        s.draft_busy_ms,
    );
    us(
        "duo_orchestrator_draft_idle_microseconds_total",
        s.draft_idle_ms,
    );
    metrics::histogram!("duo_orchestrator_generation_seconds", "mode" => mode.clone())
        .record(s.total_ms / 1e3);
    for (i, (&offered, &accepted)) in s
        .tail_offered_by_pos
        .iter()
        .zip(&s.tail_accepted_by_pos)
        .enumerate()
    {
        let pos = POSITIONS[i.min(POSITIONS.len() - 1)];
        metrics::counter!("duo_orchestrator_position_offered_total", "position" => pos)
            .increment(offered as u64);
        metrics::counter!("duo_orchestrator_position_accepted_total", "position" => pos)
            .increment(accepted as u64);
    }
    let per_round = |name: &'static str, hist: &std::collections::BTreeMap<usize, usize>| {
        let h = metrics::histogram!(name);
        for (&value, &rounds) in hist {
            for _ in 0..rounds {
                h.record(value as f64);
            }
        }
    };
    per_round("duo_orchestrator_gamma_per_round", &s.gamma_hist);
    per_round("duo_orchestrator_branches_per_round", &s.k_hist);
}
