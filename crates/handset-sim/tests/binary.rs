//! The `handset-sim` binary: flags set the faults and ID.me's behaviour, the
//! admin endpoint changes them at run time.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn flags_and_admin_endpoint() {
    handset_sim::install_crypto_provider();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let _sim = Running(
        Command::new(env!("CARGO_BIN_EXE_handset-sim"))
            .args(["--bind", &format!("127.0.0.1:{port}"), "--idme-secret", "flag-secret", "--latency", "120ms"])
            .args(["--jitter", "10ms", "--error-rate", "0", "--idme-identity-delay", "2s", "--no-idme-webhooks"])
            .args(["--idme-delivery-rate", "0", "--veratad-delivery-rate", "0.95", "--delivery-seed", "7"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if client.get(format!("{base}/_admin/faults")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "handset-sim did not start");
    let faults: Value = client.get(format!("{base}/_admin/faults")).send().await.unwrap().json().await.unwrap();
    assert_eq!(faults, json!({"latency_ms": 120, "jitter_ms": 10, "error_rate": 0.0, "hang": false}));
    let idme: Value = client.get(format!("{base}/_admin/idme")).send().await.unwrap().json().await.unwrap();
    assert_eq!(idme["secret"], "flag-secret");
    assert_eq!(idme["push_webhooks"], false);
    assert_eq!(idme["identity_delay"], "2s");

    // The flag's secret is the one ID.me's endpoints expect (base64 of "flag-secret").
    let send = |auth: &'static str| {
        client
            .post(format!("{base}/api/v2/telecom/possession/sms/send"))
            .header("authorization", auth)
            .json(&json!({"phone": "4155550123"}))
            .send()
    };
    let started = std::time::Instant::now();
    let ok = send("Bearer ID.me ZmxhZy1zZWNyZXQ=").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(120), "latency applies");
    assert_eq!(send("Bearer ID.me d3Jvbmc=").await.unwrap().status(), 401);

    // Delivery: at rate 0 the code was sent but never reached the user's inbox.
    let rates: Value = client.get(format!("{base}/_admin/delivery")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rates, json!({"idme": 0.0, "veratad": 0.95, "seed": 7}));
    let inbox = || async { client.get(format!("{base}/_admin/inbox/+14155550123")).send().await.unwrap() };
    assert_eq!(inbox().await.json::<Value>().await.unwrap(), json!([]));
    let everything = json!({"idme": 1.0, "veratad": 1.0, "seed": 1});
    let set = client.put(format!("{base}/_admin/delivery")).json(&everything).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let sent: Value = send("Bearer ID.me ZmxhZy1zZWNyZXQ=").await.unwrap().json().await.unwrap();
    let delivered: Value = inbox().await.json().await.unwrap();
    assert_eq!(delivered.as_array().map(Vec::len), Some(1), "{delivered}");
    assert_eq!(delivered[0]["provider"], "idme");
    assert_eq!(delivered[0]["code"], "123123");
    assert_eq!(delivered[0]["reference"], sent["transaction_id"]);
    let refused = client.put(format!("{base}/_admin/delivery")).json(&json!({"idme": 1.5})).send().await.unwrap();
    assert_eq!(refused.status(), 400);

    // Faults change at run time.
    let set = client.put(format!("{base}/_admin/faults")).json(&json!({"error_rate": 1.0})).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let failing = send("Bearer ID.me ZmxhZy1zZWNyZXQ=").await.unwrap();
    assert_eq!(failing.status(), 503);
    assert_eq!(failing.json::<Value>().await.unwrap()["errors"][0]["code"], 5000);
}
