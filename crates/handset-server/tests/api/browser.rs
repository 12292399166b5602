//! The network check's round trip in a real browser: headless Chromium,
//! driven over WebDriver (chromedriver), goes from the operator's link
//! (`handset-sim`'s DQE operator page) back to handset and on to a partner
//! page on loopback that shows the outcome. Chromium and chromedriver come
//! from Debian's `chromium` and `chromium-driver` (`.ci/run` installs them);
//! without them this test fails, it never skips.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::extract::Query;
use axum::response::Html;
use fantoccini::{ClientBuilder, Locator};
use handset_sim::{Sim, SimConfig};
use handset_testkit::Kind;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use crate::helpers::TestApp;
use crate::receiver::Receiver;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A partner's page: shows the `status` handset redirected the user with.
async fn partner_page() -> SocketAddr {
    async fn done(Query(query): Query<Vec<(String, String)>>) -> Html<String> {
        let status = query.iter().find(|(k, _)| k == "status").map(|(_, v)| v.as_str()).unwrap_or("none");
        Html(format!("<!doctype html><title>partner</title><p id=\"outcome\">{status}</p>"))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/done", axum::routing::get(done));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

async fn start_driver() -> (Driver, String) {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        "{CHROMEDRIVER} and {CHROMIUM} are needed (Debian packages chromium and chromium-driver; .ci/run installs them)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return (driver, url);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chromedriver did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_check_round_trip_in_headless_chromium() {
    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    let receiver = Receiver::start().await;
    let partner = partner_page().await;
    let base = sim.base_url();
    let app = TestApp::spawn_with(
        Kind::Sqlite,
        &[
            ("HANDSET__PROVIDERS__DQE__BASE_URL", base.as_str()),
            ("HANDSET__PROVIDERS__DQE__LICENCE", "sim-licence"),
            ("HANDSET__PROVIDERS__DQE__TOKEN", "sim-token"),
            ("HANDSET__PROVIDERS__DQE__NAME", "handset"),
            ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"),
            ("HANDSET__WORKERS__POLL_INTERVAL", "25ms"),
        ],
    )
    .await;
    let started = app
        .post(
            "/v1/possession",
            json!({
                "phone": "+33612345678",
                "channel": "network",
                "redirect_uri": format!("http://{partner}/done"),
                "callback_url": receiver.url("/hook"),
            }),
        )
        .await;
    assert_eq!(started.status, 201, "{}", started.text);
    let id = started.id();
    let operator_url = started.body["next_action"]["url"].as_str().unwrap().to_owned();

    let (_driver, webdriver) = start_driver().await;
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
        },
    });
    let mut builder = ClientBuilder::new(HttpConnector::new());
    builder.capabilities(capabilities.as_object().unwrap().clone());
    let browser = builder.connect(&webdriver).await.expect("a WebDriver session in headless Chromium");
    let outcome = async {
        browser.goto(&operator_url).await?;
        let shown = browser.wait().for_element(Locator::Id("outcome")).await?.text().await?;
        let landed = browser.current_url().await?;
        Ok::<_, fantoccini::error::CmdError>((shown, landed))
    }
    .await;
    let _ = browser.close().await;
    let (shown, landed) = outcome.expect("the browser reached the partner's page");
    assert_eq!(shown, "success", "the partner's page shows the outcome");
    assert_eq!(landed.path(), "/done");
    let query: Vec<(String, String)> = landed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    assert!(query.contains(&("transaction_id".to_owned(), id.clone())), "{landed}");
    assert!(!landed.as_str().contains("token") && !landed.as_str().contains("612345678"), "{landed}");

    let tx = app.transaction(&id).await.body;
    assert_eq!(tx["status"]["code"], 200, "{tx}");
    let callback = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(callback[0].json()["status"]["code"], 200);
    let hook = &callback[0];
    let signed = crate::callbacks::signature_is_valid(
        crate::callbacks::DEV_WEBHOOK_SECRET,
        &hook.header("webhook-id"),
        &hook.header("webhook-timestamp"),
        &hook.body,
        &hook.header("webhook-signature"),
    );
    assert!(signed, "the callback carries a valid Standard Webhooks signature");
}
