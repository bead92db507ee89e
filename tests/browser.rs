//! The upload page in a real browser: Debian's headless Chromium driven by
//! chromedriver (W3C WebDriver), against the app on 127.0.0.1 with the real
//! model. Uploads a pair with its ground truth, waits for the result, checks
//! the disparity image, colour bar and scores, hovers for a value, triggers a
//! server error and reads the message. Screenshots go to
//! `target/browser-artifacts/` for people to look at.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian packages
//! `chromium chromium-driver`; `make test` installs them), or their paths in
//! `STEREO_RECON_CHROMIUM` / `STEREO_RECON_CHROMEDRIVER`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

fn tool(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.is_file(),
        "{} not found: install Debian's `chromium chromium-driver` (make test does) or set {env}",
        path.display()
    );
    path
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    address: SocketAddr,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        let binary = tool("STEREO_RECON_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver { child, address: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !driver.call("GET", "/status", None).is_ok_and(|v| v["value"]["ready"] == true) {
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        driver
    }

    /// One WebDriver command; returns the JSON answer or the WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut stream = TcpStream::connect(self.address).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.address,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        // chromedriver keeps connections open whatever we ask: read the head,
        // then exactly the body it announces.
        let mut response = Vec::new();
        let mut buffer = [0u8; 8192];
        let split = loop {
            if let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                break split;
            }
            let n = stream.read(&mut buffer).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before the response head".into());
            }
            response.extend_from_slice(&buffer[..n]);
        };
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let length = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
        });
        let mut payload = response[split + 4..].to_vec();
        match length {
            Some(length) => {
                while payload.len() < length {
                    let n = stream.read(&mut buffer).map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection closed mid-body".into());
                    }
                    payload.extend_from_slice(&buffer[..n]);
                }
                payload.truncate(length);
            }
            None => return Err(format!("no Content-Length in {head}")),
        }
        let value: Value = serde_json::from_slice(&payload).map_err(|e| format!("{e}: {head}"))?;
        if value["value"].get("error").is_some() {
            return Err(format!("{}: {}", value["value"]["error"], value["value"]["message"]));
        }
        Ok(value)
    }
}

/// A browser session on top of the driver.
struct Browser<'a> {
    driver: &'a Driver,
    session: String,
}

impl<'a> Browser<'a> {
    fn open(driver: &'a Driver) -> Browser<'a> {
        let chromium = tool("STEREO_RECON_CHROMIUM", "/usr/bin/chromium");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // Headless, as root in CI, with no network beyond loopback.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1100", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--no-first-run", "--disable-extensions",
                         // WebGL (the point cloud) on the CPU: CI has no GPU.
                         "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                         // A fake camera, allowed without a prompt: the video mode's camera path.
                         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
            },
        }}});
        let answer = driver.call("POST", "/session", Some(capabilities)).expect("browser session starts");
        Browser { driver, session: answer["value"]["sessionId"].as_str().unwrap().to_owned() }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.driver.call(method, &path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    fn element(&self, css: &str) -> String {
        let found = self.cmd("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        found[ELEMENT_KEY].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_owned()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Chooses a file in an `<input type=file>` (made visible first: WebDriver
    /// only types into elements a user could reach).
    fn choose_file(&self, input_id: &str, path: &std::path::Path) {
        self.script(&format!("document.getElementById('{input_id}').hidden = false;"));
        let id = self.element(&format!("#{input_id}"));
        let text = path.canonicalize().unwrap().display().to_string();
        self.cmd("POST", &format!("/element/{id}/value"), Some(json!({ "text": text })));
        self.script(&format!("document.getElementById('{input_id}').hidden = true;"));
    }

    fn wait_for(&self, what: &str, script: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.script(script) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, css: &str) -> String {
        let js = format!("return document.querySelector('{css}').textContent;");
        self.script(&js).as_str().unwrap_or_default().to_owned()
    }

    fn hover(&self, css: &str, dx: i64, dy: i64) {
        let id = self.element(css);
        let actions = json!({ "actions": [{
            "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" },
            "actions": [{ "type": "pointerMove", "duration": 0, "x": dx, "y": dy,
                          "origin": { ELEMENT_KEY: id } }],
        }]});
        self.cmd("POST", "/actions", Some(actions));
    }

    /// Loads the page, waits for the model, and starts recording content-security-policy
    /// violations ([`Browser::csp_violations`]).
    fn open_page(&self, address: SocketAddr) {
        self.goto(&format!("http://{address}/"));
        self.wait_for(
            "the model to be ready",
            "return document.querySelector('.status-ready') !== null;",
            Duration::from_secs(30),
        );
        self.script(
            "window.cspViolations = []; document.addEventListener('securitypolicyviolation', \
             e => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI)); return true;",
        );
    }

    /// What the page's content security policy blocked since [`Browser::open_page`].
    fn csp_violations(&self) -> Value {
        self.script("return window.cspViolations;")
    }

    /// Sets a control's value as a user would, firing `event` (`change` or `input`).
    fn set_value(&self, id: &str, value: &str, event: &str) {
        self.script(&format!(
            "const e = document.getElementById('{id}'); e.value = '{value}'; e.dispatchEvent(new Event('{event}')); return true;"
        ));
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.cmd("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let dir = repo().join("target/browser-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = self.driver.call("DELETE", &format!("/session/{}", self.session), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_computes_shows_and_explains_in_a_real_browser() {
    let engine = ready_engine(2).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(stereo_recon::serve(listener, state(engine, DEFAULT_LIMITS), std::future::pending()));

    // WebDriver calls block; run the browser side on a blocking thread.
    let outcome = tokio::task::spawn_blocking(move || {
        let driver = Driver::start();
        let browser = Browser::open(&driver);
        browser.goto(&format!("http://{address}/"));
        browser.wait_for("the model to be ready", "return document.querySelector('.status-ready') !== null;", Duration::from_secs(30));
        // The page runs under its content security policy: the header is there, and
        // nothing the page does below is blocked by it.
        let csp = browser.script("return fetch('/').then(r => r.headers.get('content-security-policy'));");
        assert!(csp.as_str().is_some_and(|c| c.contains("default-src 'self'")), "CSP header: {csp}");
        browser.script(
            "window.cspViolations = []; document.addEventListener('securitypolicyviolation', \
             e => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI)); return true;",
        );

        let fixtures = repo().join("tests/fixtures/synthetic_crop");
        browser.choose_file("file-left", &fixtures.join("left.png"));
        browser.choose_file("file-right", &fixtures.join("right.png"));
        browser.choose_file("file-gt", &fixtures.join("disp_gt.pfm"));
        browser.wait_for("the button to enable", "return !document.getElementById('compute').disabled;", Duration::from_secs(10));
        browser.click("#compute");
        browser.wait_for("the busy indicator", "return !document.getElementById('busy').hidden || !document.getElementById('result').hidden;", Duration::from_secs(10));
        browser.wait_for(
            "the result",
            "return !document.getElementById('result').hidden && document.getElementById('result-disparity').naturalWidth > 0;",
            Duration::from_secs(120),
        );
        assert_eq!(browser.script("return document.getElementById('busy').hidden;"), true, "busy state must end");
        assert_eq!(browser.script("return document.getElementById('result-disparity').naturalWidth;"), 300);
        assert_eq!(browser.script("return document.getElementById('result-disparity').naturalHeight;"), 250);
        // Chromium's own PNG decoder reads every row of our PNG writer's output
        // (at this size written in two strips on a machine with two cores):
        // a row it could not inflate would stay transparent.
        let opaque = browser.script(
            "const i = document.getElementById('result-disparity'); const c = document.createElement('canvas'); \
             c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext('2d'); x.drawImage(i, 0, 0); \
             const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0; \
             for (let k = 3; k < d.length; k += 4) if (d[k] === 255) n++; return n;",
        );
        assert_eq!(opaque, 300 * 250, "every pixel of the colour PNG decoded in the browser");
        // Colour bar: drawn canvas and min/max labels in pixels.
        let bar_pixels = browser.script(
            "const c = document.getElementById('bar'); const d = c.getContext('2d').getImageData(0, 0, c.width, 1).data; return [d[0], d[1], d[2], d[4 * (c.width - 1)]];",
        );
        assert_eq!(bar_pixels, json!([35, 23, 27, 144]), "turbo end points on the colour bar");
        let (lo, hi) = (browser.text("#bar-min"), browser.text("#bar-max"));
        assert!(lo.ends_with(" px") && hi.ends_with(" px"), "{lo} / {hi}");
        let lo: f64 = lo.trim_end_matches(" px").parse().unwrap();
        let hi: f64 = hi.trim_end_matches(" px").parse().unwrap();
        assert!(lo > 0.0 && lo < hi && hi < 60.0, "{lo} .. {hi}");
        // The uncertainty view beside it, with its scale in px.
        assert_eq!(browser.script("return document.getElementById('result-uncertainty').naturalWidth;"), 300);
        let top = browser.text("#uncertainty-max");
        let top: f64 = top.strip_suffix(" px").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{top:?}"));
        assert!(top > 0.0 && top < 192.0, "{top}");
        browser.hover("#result-uncertainty", 20, 10);
        browser.wait_for("the uncertainty readout", "return !document.getElementById('uncertainty-hover').hidden;", Duration::from_secs(5));
        let readout = browser.text("#uncertainty-hover");
        assert!(readout.contains(": ±") && readout.ends_with(" px"), "{readout}");
        // Scores against the uploaded ground truth, and the error map; the most certain pixels score better.
        let scores = browser.text("#evaluation");
        assert!(scores.contains("EPE") && scores.contains("D1"), "{scores}");
        assert!(scores.contains("most certain 80 %") && scores.contains("within 1σ"), "{scores}");
        assert_eq!(browser.script("return document.getElementById('result-error').naturalWidth;"), 300);
        // Downloads are offered.
        for link in ["dl-color", "dl-png16", "dl-pfm"] {
            let href = browser.script(&format!("return document.getElementById('{link}').href;"));
            assert!(href.as_str().unwrap().starts_with("blob:"), "{link}: {href}");
        }

        // Hovering shows the disparity under the cursor.
        browser.hover("#result-disparity", 20, 10);
        browser.wait_for("the hover readout", "return !document.getElementById('hover').hidden;", Duration::from_secs(5));
        let readout = browser.text("#hover");
        // "x 20, y 10: 16.35 ± 0.69 px": the value and its standard deviation.
        let (value, sigma): (f64, f64) = readout
            .split(": ")
            .nth(1)
            .and_then(|v| v.strip_suffix(" px"))
            .and_then(|v| v.split_once(" ± "))
            .and_then(|(v, s)| Some((v.parse().ok()?, s.parse().ok()?)))
            .unwrap_or_else(|| panic!("readout {readout:?}"));
        assert!((0.0..192.0).contains(&sigma), "{readout}");
        assert!(value >= lo - 0.01 && value <= hi + 0.01, "{value} outside {lo}..{hi}");
        let result_shot = browser.screenshot("result.png");

        // A file that is no image: the server refuses, the page says why in plain words.
        browser.choose_file("file-left", &repo().join("Cargo.toml"));
        browser.click("#gt-clear");
        browser.click("#compute");
        browser.wait_for("the error message", "return !document.getElementById('error').hidden;", Duration::from_secs(30));
        let message = browser.text("#error");
        assert!(message.contains("left") && message.contains("not a recognised image"), "{message}");
        assert_eq!(browser.script("return document.getElementById('result').hidden;"), true);
        let error_shot = browser.screenshot("error.png");
        assert_eq!(browser.csp_violations(), json!([]), "blocked by the page's CSP");

        // The example comes with its calibration: depth in metres, a point cloud and distances.
        browser.click("#example");
        browser.wait_for(
            "the depth view",
            "return !document.getElementById('result').hidden && !document.getElementById('depth-figure').hidden && document.getElementById('result-depth').naturalWidth > 0;",
            Duration::from_secs(120),
        );
        let (near, far) = (browser.text("#depth-min"), browser.text("#depth-max"));
        let metres = |t: &str| t.strip_suffix(" m").and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("{t:?}"));
        // The room: nearest sphere 1.3 m, back wall 6 m.
        assert!((1.0..1.8).contains(&metres(&near)) && (5.5..7.0).contains(&metres(&far)), "{near} .. {far}");
        let camera = browser.text("#camera");
        assert!(camera.contains("480.00 px") && camera.contains("0.1000 m"), "{camera}");
        // The point cloud is drawn: many points, and the canvas is no longer blank.
        browser.wait_for("the point cloud", "return Number(document.getElementById('cloud').dataset.drawn || 0) > 0;", Duration::from_secs(30));
        let points: u64 = browser.script("return Number(document.getElementById('cloud').dataset.points);").as_u64().unwrap();
        assert!(points > 150_000, "{points} points");
        let lit = browser.script(
            "const c = document.getElementById('cloud'); const t = document.createElement('canvas'); t.width = c.width; t.height = c.height; const x = t.getContext('2d'); x.drawImage(c, 0, 0); const d = x.getImageData(0, 0, t.width, t.height).data; let n = 0; for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - 17) + Math.abs(d[i + 1] - 17) + Math.abs(d[i + 2] - 17) > 30) n++; return n / (d.length / 4);",
        );
        assert!(lit.as_f64().unwrap() > 0.3, "only {lit} of the 3D view shows points");
        // Orbit: dragging turns the view (a redraw).
        let drawn = browser.script("return Number(document.getElementById('cloud').dataset.drawn);").as_u64().unwrap();
        browser.script(
            "const c = document.getElementById('cloud'); const r = c.getBoundingClientRect(); const at = (x) => ({ clientX: r.left + x, clientY: r.top + 100, pointerId: 1, bubbles: true }); c.dispatchEvent(new PointerEvent('pointerdown', at(100))); c.dispatchEvent(new PointerEvent('pointermove', at(160))); c.dispatchEvent(new PointerEvent('pointerup', at(160)));",
        );
        browser.wait_for("a redraw after orbiting", &format!("return Number(document.getElementById('cloud').dataset.drawn) > {drawn};"), Duration::from_secs(5));
        // Two clicks on the back wall (6 m away), 160 px apart: 160 * 6 / 480 = 2.0 m.
        let click = |x: u32, y: u32| {
            browser.script(&format!(
                "const i = document.getElementById('result-depth'); const r = i.getBoundingClientRect(); i.dispatchEvent(new MouseEvent('click', {{ clientX: r.left + ({x} + 0.5) / i.naturalWidth * r.width, clientY: r.top + ({y} + 0.5) / i.naturalHeight * r.height, bubbles: true }}));"
            ));
        };
        click(240, 40);
        click(400, 40);
        let measure = browser.text("#measure");
        let distance = measure
            .strip_prefix("distance ")
            .and_then(|v| v.strip_suffix(" m"))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{measure:?}"));
        assert!((1.85..2.15).contains(&distance), "measured {distance} m, expected 2.0 m");
        for link in ["dl-depth", "dl-ply"] {
            let href = browser.script(&format!("return document.getElementById('{link}').href;"));
            assert!(href.as_str().unwrap().starts_with("blob:"), "{link}: {href}");
        }

        // The slider hides the pixels the network is least sure of, live, in every view.
        let points_now = || browser.script("return Number(document.getElementById('cloud').dataset.points);").as_u64().unwrap();
        let hidden_now = || browser.script("return Number(document.getElementById('trust').dataset.hidden);").as_u64().unwrap();
        let requests_before = browser.script("return performance.getEntriesByType('resource').length;");
        assert_eq!(hidden_now(), 0, "the slider starts at 'off'");
        let slide = |position: u32| {
            browser.script(&format!(
                "const s = document.getElementById('max-sigma'); s.value = '{position}'; s.dispatchEvent(new Event('input', {{ bubbles: true }})); return true;"
            ));
            // The page applies the slider on the next animation frame: wait for two.
            browser.script("return new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(true))));");
        };
        slide(500);
        let (hidden_some, points_some) = (hidden_now(), points_now());
        assert!(hidden_some > 0, "nothing hidden at the middle of the slider");
        assert!(points_some < points, "the point count did not drop: {points_some} of {points}");
        slide(150);
        let (hidden_more, points_fewer) = (hidden_now(), points_now());
        assert!(hidden_more > hidden_some && points_fewer < points_some, "{hidden_more} / {points_fewer} points");
        let info = browser.text("#trust-info");
        assert!(info.contains("pixels hidden"), "{info}");
        let limit = browser.text("#max-sigma-value");
        assert!(limit.starts_with('±') && limit.ends_with(" px"), "{limit}");
        // The masks are black where hidden, in the disparity and the depth view alike.
        let opaque = |id: &str| {
            browser
                .script(&format!(
                    "const c = document.getElementById('{id}'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] === 255) n++; return n;"
                ))
                .as_u64()
                .unwrap()
        };
        assert_eq!((opaque("disparity-mask"), opaque("depth-mask")), (hidden_more, hidden_more));
        assert_eq!(
            browser.script("return performance.getEntriesByType('resource').length;"),
            requests_before,
            "the slider must not send a request"
        );
        // The page hides exactly what the API masks for the same limit.
        let api_masked = browser.script(
            "const limit = document.getElementById('trust').dataset.maxSigma;              return fetch('/api/v1/examples').then(r => r.json()).then(list => Promise.all([list.examples[0].left, list.examples[0].right].map(u => fetch(u).then(r => r.blob()))))              .then(([l, r]) => { const f = new FormData(); f.append('left', l); f.append('right', r); return fetch('/api/v1/disparity?max_uncertainty=' + limit, { method: 'POST', body: f }); })              .then(r => r.json()).then(j => j.uncertainty.masked_pixels);",
        );
        let api_masked = api_masked.as_u64().unwrap_or_else(|| panic!("{api_masked}"));
        assert!(api_masked.abs_diff(hidden_more) <= hidden_more / 1000, "page hides {hidden_more}, the API masks {api_masked}");
        browser.script("document.getElementById('trust').scrollIntoView();");
        browser.screenshot("uncertainty.png");
        slide(1000);
        assert_eq!((hidden_now(), points_now()), (0, points), "back to 'off': every point again");

        browser.script("document.getElementById('depth-figure').scrollIntoView();");
        browser.screenshot("depth.png");
        browser.script("document.getElementById('cloud-figure').scrollIntoView();");
        browser.screenshot("point-cloud.png");

        // The API docs: Swagger UI renders our document, with every asset from this server.
        browser.goto(&format!("http://{address}/docs"));
        browser.wait_for(
            "the operations of the API docs",
            "return document.querySelectorAll('.opblock').length >= 9;",
            Duration::from_secs(30),
        );
        let title = browser.text(".info .title");
        assert!(title.starts_with("stereo-recon"), "{title}");
        let foreign = browser.script(&format!(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(u => !u.startsWith('http://{address}/'));"
        ));
        assert_eq!(foreign, json!([]), "fetched from elsewhere");
        browser.click("#operations-disparity-disparity button.opblock-summary-control");
        browser.wait_for("the operation to open", "return document.querySelector('.try-out__btn') !== null;", Duration::from_secs(10));
        browser.screenshot("api-docs.png");
        (result_shot, error_shot)
    })
    .await
    .expect("browser session");
    for shot in [outcome.0, outcome.1] {
        let image = image::open(&shot).unwrap();
        assert!(image.width() >= 1000, "{}", shot.display());
        println!("screenshot: {}", shot.display());
    }
}

/// A looping side-by-side WebM (VP8) of the rendered room seen by a moving rig.
fn stereo_webm(path: &std::path::Path) {
    let (width, height) = (256u32, 192u32);
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &format!("{}x{height}", 2 * width)])
        .args(["-framerate", "5", "-i", "-", "-c:v", "libvpx", "-b:v", "2M", "-pix_fmt", "yuv420p"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("ffmpeg runs (make test installs it)");
    let mut stdin = child.stdin.take().unwrap();
    for k in 0..10 {
        let scene =
            stereo_recon::synthetic::render_from(width, height, [0.02 * f64::from(k), 0.0, 0.05 * f64::from(k)]);
        let mut frame = image::RgbImage::new(2 * width, height);
        image::imageops::replace(&mut frame, &scene.left, 0, 0);
        image::imageops::replace(&mut frame, &scene.right, i64::from(width), 0);
        stdin.write_all(frame.as_raw()).unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success(), "ffmpeg encodes the test video");
}

/// Clicks `button` in the video mode and waits for a new answer for which `condition` (JS) holds.
fn next_answer(browser: &Browser, what: &str, button: &str, condition: &str) {
    let answered = browser.script("return window.stereoVideo.stats().answered;").as_u64().unwrap();
    browser.click(button);
    let script = format!("return window.stereoVideo.stats().answered > {answered} && ({condition});");
    browser.wait_for(what, &script, Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_video_mode_streams_a_stereo_video_and_draws_its_disparity_live() {
    let engine = ready_engine(2).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(stereo_recon::serve(listener, state(engine, DEFAULT_LIMITS), std::future::pending()));
    let video = std::env::temp_dir().join(format!("stereo-recon-video-{}.webm", std::process::id()));
    stereo_webm(&video);
    // The rig the video was rendered with (the same cameras at every position).
    let calibration = std::env::temp_dir().join(format!("stereo-recon-video-{}.json", std::process::id()));
    std::fs::write(&calibration, stereo_recon::calibration::formats::write_json(&scene(256, 192).calibration)).unwrap();

    let shot = tokio::task::spawn_blocking(move || {
        let driver = Driver::start();
        let browser = Browser::open(&driver);
        browser.open_page(address);
        browser.click("#mode-video");
        assert_eq!(browser.script("return document.getElementById('pair-mode').hidden;"), true);
        browser.choose_file("video-file", &video);
        browser.wait_for("the video to load", "return !document.getElementById('video-play').disabled;", Duration::from_secs(30));
        browser.click("#video-play");
        browser.wait_for(
            "two answers drawn",
            "return window.stereoVideo.stats().answered >= 2 && document.getElementById('video-output').width === 256;",
            Duration::from_secs(180),
        );
        // The canvas holds the disparity in turbo colours: mostly non-black.
        let coloured = browser.script(
            "const c = document.getElementById('video-output'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
             let n = 0; for (let k = 0; k < d.length; k += 4) if (d[k] + d[k + 1] + d[k + 2] > 30) n++; return n / (c.width * c.height);",
        );
        assert!(coloured.as_f64().unwrap() > 0.9, "the disparity is drawn: {coloured}");
        let stats = browser.text("#video-stats");
        assert!(stats.contains("frames/s") && stats.contains("latency") && stats.contains("dropped"), "{stats}");
        // Where a frame takes over a second (a CPU), the page proposes a scale that keeps up.
        let seen = browser.script(
            "return [window.stereoVideo.last().timings_ms.inference_ms, document.getElementById('video-scale-hint').textContent];",
        );
        let (inference, hint) = (seen[0].as_f64().unwrap(), seen[1].as_str().unwrap());
        assert_eq!(hint.contains("keeps up better"), inference > 1000.0, "{inference} ms: {hint:?}");
        let shot = browser.screenshot("video-mode.png");

        // Pause stops sending: no frame goes out while paused.
        browser.click("#video-play");
        browser.wait_for("the pause", "return document.getElementById('video-left').paused;", Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(500));
        let sent = browser.script("return window.stereoVideo.stats().sent;");
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(browser.script("return window.stereoVideo.stats().sent;"), sent, "nothing is sent while paused");
        // The uncertainty view and the slider apply to the next frames; Step sends one.
        browser.set_value("video-format", "uncertainty", "change");
        let caption = "document.getElementById('video-output-caption').textContent";
        next_answer(&browser, "the stepped frame's deviation", "#video-step", &format!("{caption}.startsWith('Uncertainty')"));
        // The uncertainty limit applies to the next frames: their answers count the masked pixels.
        browser.set_value("video-sigma", "4", "input");
        assert_eq!(browser.text("#video-sigma-value"), "1.00 px");
        let masked = "window.stereoVideo.last().uncertainty.masked_pixels >= 0";
        next_answer(&browser, "an answer with masked pixels counted", "#video-step", masked);
        // With the rig's calibration, depth.
        browser.choose_file("video-calib", &calibration);
        browser.wait_for("depth to be offered", "return !document.getElementById('video-format-depth').disabled;", Duration::from_secs(10));
        browser.set_value("video-format", "depth", "change");
        let depth = format!("window.stereoVideo.last().format === 'depth' && {caption}.startsWith('Depth')");
        next_answer(&browser, "the stepped frame's depth", "#video-step", &depth);
        // Record the shown disparity: a WebM to download.
        browser.click("#video-record");
        browser.click("#video-step");
        std::thread::sleep(Duration::from_secs(2));
        browser.click("#video-record");
        browser.wait_for(
            "the recording's link",
            "const a = document.getElementById('video-download'); return !a.hidden && a.href.startsWith('blob:');",
            Duration::from_secs(10),
        );
        // A camera (Chromium's fake one here, one device: taken as a packed side-by-side view),
        // on a fresh page: the calibration above is for the video's cameras, not this one.
        assert_eq!(browser.csp_violations(), json!([]), "blocked by the page's CSP");
        browser.open_page(address);
        browser.click("#mode-video");
        browser.click("#video-cameras");
        browser.wait_for(
            "the camera",
            "const v = document.getElementById('video-left'); return v.srcObject !== null && !document.getElementById('video-play').disabled;",
            Duration::from_secs(20),
        );
        assert_eq!(browser.script("return document.getElementById('video-layout').value;"), "sbs");
        next_answer(&browser, "an answer from the camera", "#video-play", "true");
        browser.click("#video-play");
        // Paused, the newest frame sent is the last one answered: the engine is idle again
        // (a process must not exit with an inference running on its engine thread).
        browser.wait_for(
            "the last frame's answer",
            "return window.stereoVideo.last().frame === window.stereoVideo.stats().sent - 1;",
            Duration::from_secs(120),
        );
        assert_eq!(browser.csp_violations(), json!([]), "blocked by the page's CSP");
        shot
    })
    .await
    .expect("browser session");
    let image = image::open(&shot).unwrap();
    assert!(image.width() >= 1000, "{}", shot.display());
    println!("screenshot: {}", shot.display());
    for extension in ["webm", "json"] {
        std::fs::remove_file(
            std::env::temp_dir().join(format!("stereo-recon-video-{}.{extension}", std::process::id())),
        )
        .ok();
    }
}
