//! The operator console in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver) against the real binary, signed in with each token. Screenshots of every
//! view go to target/console/.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::Value;
use tempfile::TempDir;

use crate::helpers::*;

const READ_TOKEN: &str = "console-read-token-0123456789";
const HOSTILE: &str = "<img src=x onerror=alert(1)>";

/// A small policy: a blocked list, a shadow rule, and (from the adaptive tests) a rule
/// that quarantines a range that never converts, so a test trips a block in a few callbacks.
const POLICY_HEAD: &str = r#"
default = "allow"
on_error = "deny"

[lists]
blocked = ["+15555550123"]

[[rule]]
name   = "blocked-numbers"
action = "deny"
number = "@blocked"

[[rule]]
name   = "watch-uk-mobiles"
action = "deny"
mode   = "shadow"
prefix = ["+447"]
"#;

/// The binary on a fresh folder with [`POLICY`] and both tokens.
async fn start_binary() -> (RunningBinary, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy = format!("{POLICY_HEAD}{}", crate::adaptive::RULE);
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    let binary = RunningBinary::start(&dir, &[("VERIGATE__API__READ_TOKEN", READ_TOKEN)]).await;
    (binary, dir)
}

/// chromedriver and the browser session it drives; both end when this is dropped.
struct Browser {
    client: Option<Client>,
    driver: std::process::Child,
}

impl Browser {
    /// A headless Chromium with a window of `width`×`height`, or `None` when the test is
    /// skipped on request because chromedriver is missing (never under CI=true).
    async fn start(width: u32, height: u32) -> Option<Self> {
        let driver_path = std::env::var("VERIGATE_TEST_CHROMEDRIVER")
            .unwrap_or_else(|_| "/usr/bin/chromedriver".to_owned());
        let chromium = std::env::var("VERIGATE_TEST_CHROMIUM")
            .unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
        if !Path::new(&driver_path).exists() || !Path::new(&chromium).exists() {
            skip_or_fail(
                &format!(
                    "{driver_path} or {chromium} is missing (Debian packages chromium and chromium-driver; .ci/run installs them)"
                ),
                "VERIGATE_SKIP_BROWSER_TESTS",
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // In a process group of its own, so that dropping the browser ends Chromium too,
        // whether or not the test closed its session.
        let driver = std::process::Command::new(&driver_path)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        if width < 600 {
            // A desktop window cannot be made this narrow; emulate the phone's screen.
            capabilities["goog:chromeOptions"]["mobileEmulation"] = serde_json::json!({
                "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2 },
            });
        }
        let mut browser = Self {
            client: None,
            driver,
        };
        let mut last_error = String::new();
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    browser.client = Some(client);
                    return Some(browser);
                }
                Err(err) => last_error = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no browser session from chromedriver: {last_error}");
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Ends the browser session (closing Chromium) before chromedriver goes.
    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }

    /// Opens the console and signs in with `token`.
    async fn sign_in(&self, base: &str, token: &str) {
        let c = self.client();
        c.goto(&format!("{base}/console")).await.unwrap();
        let field = c.wait().for_element(Locator::Id("token")).await.unwrap();
        field.send_keys(token).await.unwrap();
        c.find(Locator::Id("sign-in-button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The text of the element `css`, once it matches `ready` (up to 10 s).
    async fn text_when(&self, css: &str, ready: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..100 {
            if let Ok(el) = self.client().find(Locator::Css(css)).await {
                if let Ok(text) = el.text().await {
                    if ready(&text) {
                        return text;
                    }
                    last = text;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("`{css}` never became ready; last text: {last:?}");
    }

    /// Searches the verification view for `text`.
    async fn search(&self, text: &str) {
        let field = self
            .client()
            .wait()
            .for_element(Locator::Id("search-text"))
            .await
            .unwrap();
        field.send_keys(text).await.unwrap();
        self.click("#search-form button[type=submit]").await;
    }

    async fn count(&self, css: &str) -> usize {
        self.client()
            .find_all(Locator::Css(css))
            .await
            .unwrap()
            .len()
    }

    async fn click(&self, css: &str) {
        let el = self
            .client()
            .wait()
            .for_element(Locator::Css(css))
            .await
            .unwrap();
        el.click().await.unwrap();
    }

    /// A JavaScript expression's value in the page.
    async fn eval(&self, expression: &str) -> Value {
        self.client()
            .execute(&format!("return {expression};"), Vec::new())
            .await
            .unwrap()
    }

    /// Writes a PNG of the window to target/console/`name`.png.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client().screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Nothing on the page is wider than the window (tables scroll inside their box).
    async fn fits_width(&self) -> bool {
        self.eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await
            .as_bool()
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.driver);
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = self.driver.wait();
    }
}

async fn api(binary: &RunningBinary, method: reqwest::Method, path: &str, token: &str) -> Reply {
    api_call(&binary.client, &binary.base, method, path, token).await
}

/// Traffic with every kind of answer: allowed and converted, allowed and failed, denied
/// by a list, shadow-matched UK numbers, and a range that never converts until it is
/// quarantined (its sixth request is denied and trips the block).
async fn seed(binary: &RunningBinary) {
    for k in 0..4 {
        let id = format!("ok-{k}");
        binary
            .post_callback(request_event(&id, "sms", &format!("+4670111222{k}")))
            .await;
        binary.post_callback(result_event(&id, "SUCCESSFUL")).await;
    }
    for k in 0..3 {
        let id = format!("uk-{k}");
        binary
            .post_callback(request_event(&id, "sms", &format!("+44791112220{k}")))
            .await;
        let status = if k == 0 { "SUCCESSFUL" } else { "FAIL" };
        binary.post_callback(result_event(&id, status)).await;
    }
    binary
        .post_callback(request_event("listed-1", "sms", "+15555550123"))
        .await;
    for k in 0..5 {
        let id = format!("22507123-{k}");
        binary
            .post_callback(request_event(&id, "sms", &format!("+2250712300{k}")))
            .await;
        binary.post_callback(result_event(&id, "FAIL")).await;
    }
    let (status, answer) = binary
        .sender()
        .post(request_event("22507123-trip", "sms", "+22507123999"))
        .await;
    assert_eq!((status, answer["action"].as_str()), (200, Some("deny")));
}

/// The binary with seeded traffic, and a browser signed in to its console with `token`
/// (`None`: the browser tests are skipped on request).
async fn signed_in(
    token: &str,
    width: u32,
    height: u32,
) -> Option<(RunningBinary, TempDir, Browser)> {
    let (binary, dir) = start_binary().await;
    let browser = Browser::start(width, height).await?;
    seed(&binary).await;
    browser.sign_in(&binary.base, token).await;
    browser.text_when("#who", |t| !t.is_empty()).await;
    Some((binary, dir, browser))
}

fn number(text: &str) -> u64 {
    text.replace(',', "").trim().parse().unwrap_or(u64::MAX)
}

#[tokio::test]
async fn admin_sees_the_overview_as_the_api_counts_it_and_lifts_a_tripped_block() {
    let Some((binary, _dir, browser)) = signed_in(API_TOKEN, 1280, 800).await else {
        return;
    };
    assert_eq!(browser.text_when("#who", |_| true).await, "admin token");

    // The overview's numbers are /v1/stats over the same window.
    let stats = api(&binary, reqwest::Method::GET, "/v1/stats", API_TOKEN).await;
    let total = &stats.json()["groups"][0];
    for (id, field) in [
        ("#stat-verifications", "verifications"),
        ("#stat-allowed", "allowed"),
        ("#stat-denied", "denied"),
    ] {
        let want = total[field].as_u64().unwrap();
        let shown = browser.text_when(id, |t| number(t) == want).await;
        assert_eq!(number(&shown), want, "{id}");
    }
    let conversion = total["conversion_rate"].as_f64().unwrap();
    browser
        .text_when("#stat-conversion", |t| {
            t == format!("{:.1} %", conversion * 100.0)
        })
        .await;
    browser.text_when("#stat-blocks", |t| t == "1").await;
    // The deny rules, the country chart and the service facts are filled in.
    browser
        .text_when("#top-rules", |t| {
            t.contains("low-conversion") && t.contains("blocked-numbers")
        })
        .await;
    let countries = browser.text_when("#countries", |t| t.contains("SE")).await;
    assert!(countries.contains("100.0 %"), "{countries}");
    browser
        .text_when("#facts", |t| {
            t.contains("Store size") && t.contains("ready")
        })
        .await;
    // The only shadow rule looks at the request alone: no key to flag.
    browser
        .text_when("#flagged", |t| t.contains("No shadow rule matched a key"))
        .await;
    assert!(browser.count("#timeline svg rect").await >= 2);
    assert!(browser.fits_width().await);
    browser.screenshot("overview").await;

    // The tripped block is listed with its evidence, masked, and linked to the records.
    browser.click("#nav a[data-view=blocks]").await;
    let row = browser
        .text_when("#blocks-list", |t| t.contains("+22507123"))
        .await;
    assert!(row.contains("low-conversion"), "{row}");
    assert!(
        !row.contains("+22507123000"),
        "a full number is shown: {row}"
    );
    assert_eq!(
        browser
            .count("#blocks-list a[href='#verification/22507123-0']")
            .await,
        1
    );
    browser.screenshot("blocks").await;

    // Lifting asks first; cancelling changes nothing.
    browser.click("tr[data-key='+22507123'] button.lift").await;
    assert_eq!(
        browser
            .eval("document.getElementById('confirm').open")
            .await,
        true
    );
    browser.screenshot("blocks-confirm").await;
    browser.click("#confirm-cancel").await;
    let listed = api(
        &binary,
        reqwest::Method::GET,
        "/v1/policy/blocks",
        READ_TOKEN,
    )
    .await;
    assert_eq!(listed.json()["blocks"].as_array().unwrap().len(), 1);

    browser.click("tr[data-key='+22507123'] button.lift").await;
    browser.click("#confirm-ok").await;
    browser
        .text_when("#blocks-list", |t| {
            t.contains("Lifted the block on +22507123")
        })
        .await;
    let listed = api(
        &binary,
        reqwest::Method::GET,
        "/v1/policy/blocks",
        READ_TOKEN,
    )
    .await;
    assert_eq!(
        listed.json()["blocks"],
        serde_json::json!([]),
        "{}",
        listed.text
    );
    let (_, answer) = binary
        .sender()
        .post(request_event("22507123-after", "sms", "+22507123998"))
        .await;
    assert_eq!(answer["action"], "allow");

    // Rules: the shadow rule's precision from the outcomes of what it would have denied.
    browser.click("#nav a[data-view=rules]").await;
    let shadow = browser
        .text_when("tr[data-rule=watch-uk-mobiles]", |t| t.contains("%"))
        .await;
    assert!(shadow.contains("shadow"), "{shadow}");
    assert!(shadow.contains("66.7 %"), "{shadow}");
    assert!(shadow.contains("1 of 3 finished"), "{shadow}");
    browser.screenshot("rules").await;

    // Verification: found by number, the record told in words.
    browser.click("#nav a[data-view=verification]").await;
    browser.search("+22507123999").await;
    let story = browser
        .text_when("#record .story", |t| t.contains("deny"))
        .await;
    assert!(story.contains("by rule low-conversion"), "{story}");
    let explained = browser
        .text_when("#record .explanation", |t| t.contains("quarantine"))
        .await;
    assert!(explained.contains("+22507123"), "{explained}");
    // Each callback as received, its body one click away.
    let events = browser
        .text_when("#record .events", |t| t.contains("Request received"))
        .await;
    assert!(events.contains("Answered deny"), "{events}");
    let body = browser
        .eval("document.querySelector('#record pre.body').textContent")
        .await;
    assert!(
        body.as_str()
            .unwrap()
            .contains("\"VerificationRequestEvent\""),
        "{body}"
    );
    browser.screenshot("verification").await;
    browser.close().await;
}

#[tokio::test]
async fn the_read_token_sees_everything_but_no_action_and_its_forged_call_is_refused() {
    let Some((binary, _dir, browser)) = signed_in(READ_TOKEN, 1280, 800).await else {
        return;
    };
    assert_eq!(browser.text_when("#who", |_| true).await, "read token");
    browser.text_when("#stat-blocks", |t| t == "1").await;
    browser.click("#nav a[data-view=blocks]").await;
    browser
        .text_when("#blocks-list", |t| t.contains("+22507123"))
        .await;
    assert_eq!(browser.count("#blocks-list button").await, 0);
    assert_eq!(
        browser.count("#blocks-list th").await,
        9,
        "an Actions column"
    );

    // The same call the admin's button makes, forged from the page with the read token.
    let forged = browser
        .client()
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/v1/policy/blocks/%2B22507123', { method: 'DELETE',
               headers: { Authorization: 'Bearer ' + sessionStorage.getItem('verigate.token') } })
               .then(r => r.json().then(b => done([r.status, b.error.code])))
               .catch(e => done(String(e)));",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(forged, serde_json::json!([403, "forbidden"]));
    let listed = api(
        &binary,
        reqwest::Method::GET,
        "/v1/policy/blocks",
        API_TOKEN,
    )
    .await;
    assert_eq!(listed.json()["blocks"].as_array().unwrap().len(), 1);

    // The token lives in this tab's sessionStorage; no cookie is set.
    assert_eq!(browser.eval("document.cookie").await, "");
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('verigate.token')")
            .await,
        READ_TOKEN
    );
    // A reload keeps the tab signed in, with the same role.
    browser.client().refresh().await.unwrap();
    browser
        .text_when("#blocks-list", |t| t.contains("+22507123"))
        .await;
    assert_eq!(browser.text_when("#who", |_| true).await, "read token");
    // Signing out forgets it.
    browser.click("#sign-out").await;
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('verigate.token')")
            .await,
        Value::Null
    );
    browser.close().await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_the_reason() {
    let (binary, _dir) = start_binary().await;
    let Some(browser) = Browser::start(1280, 800).await else {
        return;
    };
    browser.sign_in(&binary.base, "not-the-token-at-all").await;
    let said = browser.text_when("#sign-in-error", |t| !t.is_empty()).await;
    assert!(said.contains("refused"), "{said}");
    assert!(said.contains("not valid"), "{said}");
    assert_eq!(
        browser.eval("document.getElementById('app').hidden").await,
        true
    );
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('verigate.token')")
            .await,
        Value::Null
    );
    browser.screenshot("sign-in-refused").await;
    browser.close().await;
}

#[tokio::test]
async fn a_hostile_reference_is_shown_as_text_and_runs_nothing() {
    let (binary, _dir) = start_binary().await;
    let Some(browser) = Browser::start(1280, 800).await else {
        return;
    };
    let mut body: Value =
        serde_json::from_str(&request_event("xss-1", "sms", "+46701112299")).unwrap();
    body["reference"] = HOSTILE.into();
    body["custom"] = "<script>window.pwned = 1</script>".into();
    assert_eq!(binary.post_callback(body.to_string()).await, 200);
    browser.sign_in(&binary.base, API_TOKEN).await;
    browser.text_when("#who", |t| !t.is_empty()).await;
    // A page that ran the payload would have an <img> with an onerror handler.
    browser
        .client()
        .execute(
            "window.alerted = false; window.alert = () => { window.alerted = true; };",
            Vec::new(),
        )
        .await
        .unwrap();
    browser.click("#nav a[data-view=verification]").await;
    browser.click("#search-kind").await;
    browser
        .client()
        .find(Locator::Id("search-kind"))
        .await
        .unwrap()
        .select_by_value("reference")
        .await
        .unwrap();
    browser.search(HOSTILE).await;
    let shown = browser
        .text_when("#record .field-reference", |t| !t.is_empty())
        .await;
    assert_eq!(shown, HOSTILE);
    let custom = browser
        .text_when("#record .field-custom", |t| !t.is_empty())
        .await;
    assert_eq!(custom, "<script>window.pwned = 1</script>");
    assert_eq!(browser.count("#record img").await, 0);
    assert_eq!(browser.count("#record script").await, 0);
    assert_eq!(browser.eval("window.alerted").await, false);
    assert_eq!(browser.eval("window.pwned === undefined").await, true);
    // Even the page's own code could not turn a string into markup: the CSP refuses it.
    let refused = browser
        .eval("(() => { try { document.body.insertAdjacentHTML('beforeend', '<b>x</b>'); return false; } catch (e) { return true; } })()")
        .await;
    assert_eq!(refused, true, "Trusted Types do not guard HTML sinks");
    browser.close().await;
}

#[tokio::test]
async fn every_view_fits_a_phone_width_screen() {
    let Some((binary, _dir, browser)) = signed_in(API_TOKEN, 390, 844).await else {
        return;
    };
    browser.text_when("#stat-blocks", |t| t == "1").await;
    let width = browser.eval("window.innerWidth").await.as_u64().unwrap();
    assert!(width < 500, "the window is {width} wide");
    for view in ["overview", "blocks", "rules", "verification"] {
        browser
            .client()
            .goto(&format!("{}/console#{view}", binary.base))
            .await
            .unwrap();
        browser
            .text_when(&format!("#view-{view} h1"), |t| !t.is_empty())
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(browser.fits_width().await, "{view} is wider than the phone");
        browser.screenshot(&format!("phone-{view}")).await;
    }
    browser.close().await;
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_under_a_strict_content_security_policy() {
    let (binary, _dir) = start_binary().await;
    // The headers matter here, so the raw response rather than a `Reply`.
    let fetch = async |path: &str, if_none_match: Option<&str>| {
        let mut request = binary.client.get(format!("{}{path}", binary.base));
        if let Some(etag) = if_none_match {
            request = request.header("if-none-match", etag);
        }
        request.send().await.unwrap()
    };
    for path in ["/console", "/console/console.js", "/console/console.css"] {
        let reply = fetch(path, None).await;
        assert_eq!(reply.status(), 200, "{path}");
        let csp = reply.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("require-trusted-types-for 'script'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(reply.headers()["x-content-type-options"], "nosniff");
        assert_eq!(reply.headers()["x-frame-options"], "DENY");
        let etag = reply.headers()["etag"].to_str().unwrap().to_owned();
        // A browser that has the file is told so without the body.
        let again = fetch(path, Some(&etag)).await;
        assert_eq!(again.status(), 304, "{path}");
    }
    // The page links the API's contract, which a signed-out browser may open.
    let page = fetch("/console", None).await.text().await.unwrap();
    assert!(page.contains(r#"href="/v1/openapi.json""#), "{page}");
    let document = reply(fetch("/v1/openapi.json", None).await).await;
    assert_eq!(document.status, 200);
    let missing = reply(fetch("/console/secrets.txt", None).await).await;
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "not_found")
    );

    // What the console's sign-in asks: which token this is.
    let admin = api(&binary, reqwest::Method::GET, "/v1/status", API_TOKEN).await;
    assert_eq!(admin.json()["role"], "admin", "{}", admin.text);
    assert!(admin.json()["store"]["size_bytes"].as_u64().unwrap() > 0);
    let read = api(&binary, reqwest::Method::GET, "/v1/status", READ_TOKEN).await;
    assert_eq!(read.json()["role"], "read");
    let wrong = api(&binary, reqwest::Method::GET, "/v1/status", "wrong-token").await;
    assert_eq!(
        (wrong.status, wrong.error_code().as_str()),
        (401, "invalid_token")
    );
}

#[tokio::test]
async fn stored_rule_outcomes_give_a_shadow_rules_precision_and_survive_a_restart() {
    let (binary, dir) = start_binary().await;
    seed(&binary).await;
    let read = |binary: &RunningBinary| {
        let (client, base) = (binary.client.clone(), binary.base.clone());
        async move {
            let reply = api_call(
                &client,
                &base,
                reqwest::Method::GET,
                "/v1/stats/rules?since=2026-01-01T00:00:00Z",
                READ_TOKEN,
            )
            .await;
            assert_eq!(reply.status, 200, "{}", reply.text);
            reply.json()["rules"].as_array().unwrap().clone()
        }
    };
    let rule = |rules: &[Value], name: &str| {
        rules
            .iter()
            .find(|r| r["rule"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {rules:?}"))
    };
    let before = read(&binary).await;
    let watch = rule(&before, "watch-uk-mobiles");
    assert_eq!(watch["shadow"]["would_deny"], 3);
    assert_eq!(watch["shadow"]["would_deny_successful"], 1);
    assert_eq!(watch["shadow"]["results"]["FAIL"], 2);
    let precision = watch["shadow"]["precision"].as_f64().unwrap();
    assert!((precision - 2.0 / 3.0).abs() < 1e-9, "{precision}");
    assert_eq!(watch["decided"]["verifications"], 0);
    let listed = rule(&before, "blocked-numbers");
    assert_eq!(
        (
            listed["decided"]["denied"].as_u64(),
            listed["decided"]["results"]["NONE"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(rule(&before, "default")["decided"]["allowed"], 12);

    // The policy's own counts start again with the process; the stored ones do not.
    binary.terminate();
    let binary = RunningBinary::start(&dir, &[("VERIGATE__API__READ_TOKEN", READ_TOKEN)]).await;
    let after = read(&binary).await;
    assert_eq!(after, before);

    let bad = api_call(
        &binary.client,
        &binary.base,
        reqwest::Method::GET,
        "/v1/stats/rules?group_by=rule",
        READ_TOKEN,
    )
    .await;
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "bad_request")
    );
    assert!(bad.text.contains("group_by"), "{}", bad.text);
}

#[tokio::test]
async fn the_overview_lists_the_keys_a_shadow_rule_would_deny() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "default = \"allow\"\n[[rule]]\nname = \"range-watch\"\naction = \"deny\"\n\
         mode = \"shadow\"\nrate_limit = { key = \"range:3\", max = 2, window = \"1h\" }\n",
    )
    .unwrap();
    let binary = RunningBinary::start(&dir, &[]).await;
    let Some(browser) = Browser::start(1280, 800).await else {
        return;
    };
    for i in 0..3 {
        let (_, answer) = binary
            .sender()
            .post(request_event(
                &format!("watched-{i}"),
                "sms",
                &format!("+4670555500{i}"),
            ))
            .await;
        assert_eq!(answer["action"], "allow", "shadow rules decide nothing");
    }
    browser.sign_in(&binary.base, API_TOKEN).await;
    let flagged = browser
        .text_when("#flagged", |t| t.contains("+46705555"))
        .await;
    assert!(flagged.contains("range-watch"), "{flagged}");
    assert!(flagged.contains("= 3.000 (limit 2.000)"), "{flagged}");
    assert_eq!(browser.count("#flagged tbody tr").await, 1);
    assert!(browser.fits_width().await);
    browser.screenshot("overview-flagged").await;
}
