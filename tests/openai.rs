//! The OpenAI-compatible HTTP API, driven by the official `openai` Python
//! package (tests/openai_client.py). Needs `python3` with `openai`
//! installed; without it the test is skipped, unless DUO_REQUIRE_OPENAI=1
//! (as in CI), where a missing package fails it.

mod common;

use duo_rpc::pb::{self, generate_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_client_against_the_orchestrator() {
    let python = std::env::var("DUO_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var("DUO_REQUIRE_OPENAI").is_err(),
            "the `openai` Python package is required (pip install openai) but `{python} -c 'import openai'` failed"
        );
        eprintln!("skipped: the `openai` Python package is not installed (pip install openai)");
        return;
    }
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let prompt = "BRUTUS.\nWhat means this shouting?";
    let expected = dep
        .client()
        .await
        .generate(pb::GenerateRequest {
            prompt: Some(generate_request::Prompt::Text(prompt.into())),
            max_new_tokens: 48,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .text;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let base = format!("http://{}/v1", dep.http);
    let out = tokio::process::Command::new(&python)
        .args([script, &base, prompt, &expected])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
