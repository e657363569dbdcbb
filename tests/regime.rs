//! `duo bench --regime gpu-like` from scratch: the command builds the
//! stand-ins itself (into a fresh cache), runs the three modes on them and
//! ends with the headline JSON, whose outputs are identical across modes.
//! Timings are reported, never asserted.

#[test]
fn bench_in_the_gpu_like_regime_builds_its_stand_ins_and_runs() {
    let cache = std::env::temp_dir().join(format!("duo-regime-test-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duo"))
        .args(["bench", "--regime", "gpu-like", "--regime-cache"])
        .arg(&cache)
        .args(["--per-category", "1", "--max-new-tokens", "24"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("built the gpu-like stand-ins"), "{stderr}");
    assert!(cache.join("target/model.onnx").exists());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap();
    let h: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(h["regime"], "gpu-like", "{h}");
    assert_eq!(h["hard_divergences"], 0, "{h}");
    assert_eq!(h["prompts"], 5, "{h}");
    for key in ["target_step_ms", "draft_step_ms", "verify8_over_1"] {
        assert!(h[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {h}");
    }
    // No 2-thread row: a GPU target can't borrow the CPU's cores.
    assert!(h["ar_2threads_tokens_per_s"].is_null(), "{h}");
    std::fs::remove_dir_all(&cache).unwrap();
}
