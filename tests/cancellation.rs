//! Clients that go away free their sessions on both services promptly.

mod common;

use std::time::{Duration, Instant};

use duo_rpc::pb::draft_client::DraftClient;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::pb::{self, generate_request};

async fn sessions_open(dep: &common::Deployment) -> (u32, u32) {
    let t = TargetClient::new(common::channel(dep.target).await)
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions_open;
    let d = DraftClient::new(common::channel(dep.drafts[0]).await)
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions_open;
    (t, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_streams_and_deadlines_free_sessions() {
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let mut client = dep.client().await;
        tasks.push(tokio::spawn(async move {
            let req = pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::Text(format!("KING. Speak, {i}"))),
                max_new_tokens: 300,
                temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
                seed: i,
                mode: if i % 3 == 0 {
                    pb::Mode::Speculative
                } else {
                    pb::Mode::Duodecoding
                } as i32,
                ..Default::default()
            };
            let Ok(resp) = client.generate_stream(req).await else {
                return;
            };
            let mut stream = resp.into_inner();
            // Read a pseudo-random number of chunks, then walk away.
            for _ in 0..(i * 7919) % 6 {
                if stream.message().await.ok().flatten().is_none() {
                    break;
                }
            }
            drop(stream);
        }));
    }
    // Unary calls whose deadline passes mid-generation.
    for i in 0..5u64 {
        let mut client = dep.client().await;
        tasks.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::Text(format!("QUEEN. Alas, {i}"))),
                max_new_tokens: 400,
                mode: pb::Mode::Duodecoding as i32,
                ..Default::default()
            });
            req.set_timeout(Duration::from_millis(20));
            let _ = client.generate(req).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let clients_gone = Instant::now();
    let deadline = clients_gone + Duration::from_secs(10);
    loop {
        let open = sessions_open(&dep).await;
        if open == (0, 0) {
            eprintln!(
                "55 abandoned generations: sessions back to 0 on both workers {} ms after the last client left",
                clients_gone.elapsed().as_millis()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions still open (target, draft): {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
